"""The one model contract: a raw network `fn(x, t, **cond)` wrapped into a denoiser D(x, stage) -> x0.

Parameterizations (epsilon, v, sample, consistency) live only here; classifier-free guidance combines the two
network outputs here, before the parameterization (exactly where diffusers pipelines combine them); clipping and
dynamic thresholding of x0 are post-processing steps applied by the loop. Solvers never see any of it.

Each stage's scalars (c_in, c_skip, c_out, timestep) are computed on the host once, before the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import torch

from .plan import Plan, Stage

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "consistency")


@dataclass(frozen=True)
class Preconditioning:
    """D(x) = c_skip * x + c_out * fn(c_in * x, timestep), for a VP state x = alpha * x0 + sigma * eps."""

    c_in: float
    c_skip: float
    c_out: float


def preconditioning(
    prediction_type: str, stage: Stage, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> Preconditioning:
    """The per-stage scalars of a parameterization.

    epsilon: x0 = (x - sigma * eps) / alpha. v_prediction (Salimans & Ho 2022): x0 = alpha * x - sigma * v.
    sample: the network predicts x0. consistency (Song et al. 2023, appendix C): a network on the VE sample
    x_ve = x / alpha with c_in = 1 / sqrt(s^2 + sd^2), c_skip = sd^2 / ((s - s_min)^2 + sd^2),
    c_out = (s - s_min) * sd / sqrt(s^2 + sd^2), s = sigma / alpha.
    """
    alpha, sigma = stage.alpha, stage.sigma
    if prediction_type == "epsilon":
        return Preconditioning(1.0, 1.0 / alpha, -sigma / alpha)
    if prediction_type == "v_prediction":
        return Preconditioning(1.0, alpha, -sigma)
    if prediction_type == "sample":
        return Preconditioning(1.0, 0.0, 1.0)
    if prediction_type == "consistency":
        s, sd = sigma / alpha, sigma_data
        c_skip = sd**2 / ((s - sigma_min) ** 2 + sd**2)
        c_out = (s - sigma_min) * sd / math.sqrt(s**2 + sd**2)
        return Preconditioning(1.0 / (alpha * math.sqrt(s**2 + sd**2)), c_skip / alpha, c_out)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


class Denoiser:
    """D(x, k) for stage k of a plan: the network call(s), guidance and parameterization.

    fn: the raw network, fn(x_in [B', ...], t [B'], **cond) -> output shaped like x_in.
    cond / uncond: keyword tensors with a leading batch dim B, concatenated as [uncond, cond] when guided into
    `self.cond` (the tensors every call passes, [copies * B, ...]). guidance_scale == 1 means one network call per
    stage and uncond is not used; a tensor scale, 0-d or [B] (one per sample), is read at each call.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        plan: Plan,
        prediction_type: str,
        *,
        batch: int,
        device: torch.device,
        cond: Mapping[str, torch.Tensor] | None = None,
        uncond: Mapping[str, torch.Tensor] | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
        **parameterization: float,
    ):
        self.fn = fn
        # What depends on the plan alone is computed once per plan (Plan.memo), not per run: the scalars, and the
        # timesteps the network receives, which no one mutates. scalars_key names the scalars for fused_step.
        self.scalars_key = ("preconditioning", prediction_type, tuple(sorted(parameterization.items())))
        self.scalars: list[Preconditioning] = plan.memo(
            self.scalars_key, lambda: [preconditioning(prediction_type, s, **parameterization) for s in plan.stages])
        self.guided = is_guided(guidance_scale)
        self.guidance_scale = guidance_scale
        rows = (2 if self.guided else 1) * batch
        self.timesteps: list[torch.Tensor] = plan.memo(("timesteps", rows, torch.device(device)),
                                                       lambda: _timestep_table(plan, rows, device))
        cond = dict(cond or {})
        if self.guided:
            uncond = dict(uncond or {})
            cond = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
        self.cond = cond

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x: [B, ...] the state at stage k's evaluation point -> the (guided) denoised estimate [B, ...]."""
        return self.precondition(self.guide(self.network(x, k)), x, k)

    def network(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The raw network output at stage k's evaluation point x [B, ...]: [B, ...], or guided [2B, ...] =
        [uncond; cond] (both halves from one call)."""
        c = self.scalars[k]
        x_in = x if c.c_in == 1.0 else x * c.c_in
        if self.guided:
            x_in = torch.cat([x_in, x_in])
        cond = self.cond
        out = self.fn(x_in, self.timesteps[k], **cond) if cond else self.fn(x_in, self.timesteps[k])
        if out.shape != x_in.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x_in.shape)}; it "
                             "must return a prediction shaped like its input (split off learned-variance channels)")
        return out

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """The network output [B, ...] for the plan: out itself unguided; from [uncond; cond] = out [2B, ...],
        uncond + w * (cond - uncond)."""
        if not self.guided:
            return out
        # slices, not chunk(2): chunk's size rule would pin a symbolic batch when the loop is exported
        rows = out.shape[0] // 2
        out_uncond, out_cond = out[:rows], out[rows:]
        scale = self.guidance_scale
        if isinstance(scale, torch.Tensor) and scale.dim() == 1:  # [B]: one scale per sample
            scale = scale.view(-1, *([1] * (out.dim() - 1)))
        return out_uncond + scale * (out_cond - out_uncond)

    def precondition(self, out: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
        """Stage k's denoised estimate from the (guided) network output out [B, ...] at the evaluation point x."""
        c = self.scalars[k]
        return torch.add(x * c.c_skip, out, alpha=c.c_out) if c.c_skip != 0.0 else out * c.c_out


def _timestep_table(plan: Plan, rows: int, device: torch.device | str) -> list[torch.Tensor]:
    """Per stage, the timesteps [rows] its network call receives (int64, or float32 for sigma-interpolated plans):
    views of one [stages, rows] table made once on the device (no per-step host->device copy or tensor indexing)."""
    times = torch.tensor([s.timestep for s in plan.stages], dtype=torch.float64)
    if plan.integer_timesteps:
        times = times.round()
    dtype = torch.int64 if plan.integer_timesteps else torch.float32
    return list(times.to(dtype)[:, None].expand(-1, rows).to(device).unbind(0))


def is_guided(guidance_scale: float | Sequence[float] | torch.Tensor) -> bool:
    """Whether a scale runs classifier-free guidance: a number unless it is 1; anything else always (a tensor: a device
    scalar a CUDA graph reads or one scale per sample; a list of per-sample scales, which inputs.guidance_values
    returns only when they differ)."""
    if type(guidance_scale) in (float, int):  # the common case, without the ABC check below (~0.3 us)
        return guidance_scale != 1.0
    return not isinstance(guidance_scale, Real) or guidance_scale != 1.0


def clip(limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 clipped to [-limit, limit] (DDPM's clip_sample)."""
    return lambda x0: x0.clamp(-limit, limit)


def dynamic_threshold(ratio: float, max_value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile of
    |x0| clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s. Statistics in float32 or better."""

    def threshold(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # [B, 1]
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)

    return threshold
