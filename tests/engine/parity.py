"""Test helper: run diffusers' own scheduler loop on the same network, config and noise as blitzdiff.

Stochastic samplers draw their noise through `randn_tensor` in each diffusers scheduler module; `diffusers_loop`
swaps it for blitzdiff's per-sample noise of the same stage, so stochastic samplers are compared exactly too.

diffusers' sigma-based schedulers hold their sigmas as float32 tensors, so every coefficient of their steps is a
float32 scalar, and several round the sample to float32 ("upcast"). In ill-conditioned cases that rounding alone
moves diffusers' result by more than 1e-5, so the tests also run `diffusers_loop(..., float64=True)`: diffusers'
unchanged code on the same float32 sigma (and init_noise_sigma) values, in float64 arithmetic. blitzdiff's float64
plan must match that to float64 rounding.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from unittest import mock

import torch

from blitzdiff.engine import noise as engine_noise
from blitzdiff.engine.noise import seed_tensor


def gaussian(seeds: torch.Tensor, stream: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """The noise blitzdiff.sample draws by default (noise_backend="auto": the C++ kernel on CPU where built)."""
    backend = engine_noise.resolve_noise_backend("auto", seeds.device, dtype)
    return engine_noise.gaussian(seeds, stream, shape, dtype, backend=backend)


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


class _Float64Torch(types.ModuleType):
    """The torch module, except that `torch.float32` names float64 (diffusers' `sample.to(torch.float32)` upcast and
    the dtype of the noise it draws)."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def float64_arithmetic(scheduler_class: str) -> Iterator[None]:
    """The diffusers scheduler class with its float32 sigma values promoted to float64 after set_timesteps, its step
    run with torch.float32 meaning float64, and an init_noise_sigma property (Euler, Heun) evaluated on the float32
    sigmas as diffusers does, then promoted: the same schedule and algorithm at blitzdiff's plan precision (the
    training betas stay float32)."""
    import diffusers

    cls = getattr(diffusers, scheduler_class)
    module = sys.modules[cls.__module__]
    set_timesteps, step = cls.set_timesteps, cls.step

    def set_timesteps64(self, *args, **kwargs):
        set_timesteps(self, *args, **kwargs)
        self.sigmas = self.sigmas.double()  # the same float32 values

    def step64(self, *args, **kwargs):
        with mock.patch.object(module, "torch", _Float64Torch("torch")):
            return step(self, *args, **kwargs)

    patches = {"set_timesteps": set_timesteps64, "step": step64}
    init_noise_sigma = inspect.getattr_static(cls, "init_noise_sigma", None)
    if isinstance(init_noise_sigma, property):

        def init_noise_sigma64(self):  # diffusers' float32 value
            return init_noise_sigma.fget(SimpleNamespace(sigmas=self.sigmas.float(), config=self.config)).double()

        patches["init_noise_sigma"] = property(init_noise_sigma64)
    with mock.patch.multiple(cls, **patches):
        yield


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
    float64: bool = False,
) -> torch.Tensor:
    """The standard diffusers denoising loop (as in its pipelines), returning the final sample; float64=True runs
    the scheduler's own code in float64 arithmetic (`float64_arithmetic`)."""
    import diffusers

    seeds = seed_tensor(None, noise.shape[0], noise.device) if seeds is None else seeds
    evaluations = 0

    def our_noise(shape, *args, **kwargs):  # the noise blitzdiff draws after the latest evaluation
        return gaussian(seeds, 2 * (evaluations - 1) + 1, tuple(shape[1:]), kwargs.get("dtype") or noise.dtype)


    with contextlib.ExitStack() as stack:
        for name in SCHEDULER_MODULES:
            module = importlib.import_module(f"diffusers.schedulers.{name}")
            if hasattr(module, "randn_tensor"):
                stack.enter_context(mock.patch.object(module, "randn_tensor", our_noise))
        if float64:
            stack.enter_context(float64_arithmetic(scheduler_class))
        scheduler = getattr(diffusers, scheduler_class).from_config(config)
        if set_timesteps_kwargs:
            scheduler.set_timesteps(**set_timesteps_kwargs)
        else:
            scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            evaluations += 1
            out = fn(model_input, t.expand(x.shape[0]))
            x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
    return x
