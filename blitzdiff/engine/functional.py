"""`blitzdiff.sample`: the functional API. No network object needed, only `fn(x, t, **cond) -> output`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import SchedulerConfig, resolve
from .denoiser import Denoiser, clip, dynamic_threshold, is_guided
from .inputs import finite_number, guidance_values
from .noise import resolve_noise_backend, seed_tensor
from .sampler import Postprocess, Scope, run_plan
from .solvers import build_plan


def postprocessing(config: SchedulerConfig) -> Postprocess | None:
    """x0 post-processing with diffusers' precedence: thresholding, else clip_sample, else clip_denoised (CM)."""
    f = config.fields
    if f.get("thresholding"):
        return dynamic_threshold(f["dynamic_thresholding_ratio"], f["sample_max_value"])
    if f.get("clip_sample"):
        return clip(f["clip_sample_range"])
    if f.get("clip_denoised"):
        return clip(1.0)
    return None


def parameterization(config: SchedulerConfig) -> tuple[str, dict[str, float]]:
    """The network's prediction type and its extra constants (consistency models carry their own)."""
    if config.class_name == "CMStochasticIterativeScheduler":
        return "consistency", {"sigma_data": config.sigma_data, "sigma_min": config.sigma_min}
    return config.prediction_type, {}


def _check_conditioning(name: str, tensors: Mapping[str, torch.Tensor] | None, batch: int, device: torch.device):
    for key, value in (tensors or {}).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.shape[:1] != (batch,):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}; its first dim must be the batch "
                             f"size of noise, {batch}")
        if value.device != device:
            raise ValueError(f"{name}[{key!r}] is on {value.device} but noise is on {device}")


def sample(
    fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    scheduler_config: Mapping[str, Any] | str | Path | None = None,
    prediction_type: str | None = None,
    guidance_scale: float | Sequence[float] | torch.Tensor = 1.0,
    cond: Mapping[str, torch.Tensor] | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    eta: float | None = None,
    timesteps: Sequence[int] | None = None,
    seeds: int | Sequence[int] | torch.Tensor | None = None,
    noise_backend: str = "auto",
    scope: Scope | None = None,
    step_backend: str = "auto",
) -> torch.Tensor:
    """Sample with a raw network `fn(x, t, **cond)` from unit-variance `noise` [B, ...]; returns the final sample.

    fn receives exactly what a diffusers UNet receives at that step (the scaled model input and the diffusers
    timestep, as a [B] tensor, or [2B] with guidance: uncond first) and returns the raw network output.
    sampler: a name from `blitzdiff.SAMPLERS`; scheduler_config: a diffusers scheduler config (dict, json file or
    folder), whose class selects the sampler unless `sampler` is given. prediction_type overrides the config's.
    guidance_scale != 1 runs classifier-free guidance with `uncond`; one scale per sample (a sequence or a [B] float
    tensor) guides each row by its own. eta: DDIM's noise weight. timesteps: explicit
    training timesteps for samplers that take them (lcm, consistency). seeds: per-sample seeds of the sampler's own
    noise (an int s means s, s+1, ...; default 0, 1, ...): sample i depends only on its own seed.
    noise_backend: how that noise is drawn: "auto" (default: the compiled kernel for noise's device where one is
    built, else "ref"), "ref" (plain tensor ops: what torch.compile fuses best and export traces), "cpu", "cuda".
    All give the same integer hash; their float32 log / cos may differ by an ulp, so pin one to compare runs.
    scope(stage, "network" | "solver"): a context manager around each part of each stage (profiling ranges).
    step_backend: "auto" (default: "cpu" for float32 / float64 CPU tensors where blitzdiff._C is built, else
    "ref"), "cpu" (guidance, preconditioning and update of a stage in one fused kernel call, where the stage allows:
    blitzdiff.engine.fused_step) or "ref" (the same math as separate torch ops); they agree to rounding.
    """
    if eta is not None:
        eta = finite_number("eta", eta, minimum=0.0)
    overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
    config = resolve(sampler, scheduler_config, **overrides)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a floating-point tensor [B, ...] with a batch dim")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf")
    batch, device = noise.shape[0], noise.device
    backend = resolve_noise_backend(noise_backend, device, noise.dtype)
    _check_conditioning("cond", cond, batch, device)
    guidance_scale = _guidance(guidance_scale, batch, device)
    if is_guided(guidance_scale):
        shown = f"={guidance_scale}" if isinstance(guidance_scale, float) else " (one per sample)"
        if not cond:
            raise ValueError(f"guidance_scale{shown} needs conditioning: pass cond and uncond (same keys), or "
                             "guidance_scale=1.0 for unguided sampling")
        if set(uncond or {}) != set(cond or {}):
            raise ValueError(f"guidance_scale{shown} needs uncond with the same keys as cond "
                             f"({sorted(cond or {})}), got {sorted(uncond or {})}")
        _check_conditioning("uncond", uncond, batch, device)
    plan = build_plan(config, steps, eta=eta, timesteps=timesteps)
    kind, constants = parameterization(config)
    denoiser = Denoiser(fn, plan, kind, batch=batch, device=device, cond=cond, uncond=uncond,
                        guidance_scale=guidance_scale, **constants)
    x = noise * plan.init_scale
    return run_plan(plan, denoiser, x, seed_tensor(seeds, batch, device), postprocessing(config), backend, scope,
                    step_backend)


def _guidance(scale: Any, batch: int, device: torch.device) -> float | torch.Tensor:
    """A number, or a float32 [batch] tensor on `device` when the samples' scales differ."""
    if isinstance(scale, torch.Tensor) and scale.is_floating_point() and scale.dim() == 1:
        if scale.shape[0] != batch:
            raise ValueError(f"guidance_scale has {scale.shape[0]} values for a batch of {batch}")
        if not torch.isfinite(scale).all():
            raise ValueError("guidance_scale contains NaN or Inf")
        return scale.to(device, torch.float32)
    scales = guidance_values(scale, batch)
    return scales if isinstance(scales, float) else torch.tensor(scales, dtype=torch.float32, device=device)
