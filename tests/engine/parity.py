"""Test helper: run diffusers' own scheduler loop on the same network, config and noise as blitzdiff.

Stochastic samplers draw their noise through `randn_tensor` in each diffusers scheduler module; `diffusers_loop`
swaps it for blitzdiff's per-sample noise of the same stage, so stochastic samplers are compared exactly too.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from unittest import mock

import torch

from blitzdiff.engine.noise import gaussian, seed_tensor

SCHEDULER_MODULES = [
    "scheduling_ddim", "scheduling_ddpm", "scheduling_euler_discrete", "scheduling_euler_ancestral_discrete",
    "scheduling_heun_discrete", "scheduling_dpmsolver_multistep", "scheduling_dpmsolver_singlestep",
    "scheduling_unipc_multistep", "scheduling_lcm", "scheduling_consistency_models",
]


def toy_network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, timestep-dependent stand-in for a UNet: [B, ...], [B] -> [B, ...]."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.7 * torch.tanh(x) * scale + 0.2 * x.roll(1, dims=-1)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def diffusers_loop(
    scheduler_class: str,
    config: dict,
    fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    steps: int | None,
    *,
    seeds: torch.Tensor | None = None,
    step_kwargs: dict | None = None,
    set_timesteps_kwargs: dict | None = None,
) -> torch.Tensor:
    """The standard diffusers denoising loop (as in its pipelines), returning the final sample."""
    import diffusers

    scheduler = getattr(diffusers, scheduler_class).from_config(config)
    if set_timesteps_kwargs:
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(steps)
    seeds = seed_tensor(None, noise.shape[0], noise.device) if seeds is None else seeds
    evaluations = 0

    def our_noise(shape, *args, **kwargs):  # the noise blitzdiff draws after the latest evaluation
        return gaussian(seeds, 2 * (evaluations - 1) + 1, tuple(shape[1:]), kwargs.get("dtype") or noise.dtype)

    with contextlib.ExitStack() as stack:
        for name in SCHEDULER_MODULES:
            module = importlib.import_module(f"diffusers.schedulers.{name}")
            if hasattr(module, "randn_tensor"):
                stack.enter_context(mock.patch.object(module, "randn_tensor", our_noise))
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            evaluations += 1
            out = fn(model_input, t.expand(x.shape[0]))
            x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
    return x
