"""The sampling loop: a dumb interpreter of a Plan (ARCHITECTURE.md contract 3).

No `.item()`, no data-dependent branches, no progress bar: every decision was taken on the host when the plan was
built, so the whole N-step loop can be captured in one CUDA graph or compiled with `fullgraph=True`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noise import gaussian
from .plan import Combination, Plan

Denoise = Callable[[torch.Tensor, int], torch.Tensor]  # (point [B, ...], stage index) -> denoised [B, ...]
Postprocess = Callable[[torch.Tensor], torch.Tensor]  # x0 -> clipped / thresholded x0


def combine(
    c: Combination,
    x: torch.Tensor,
    history: list[torch.Tensor],
    raw: torch.Tensor | None,
    seeds: torch.Tensor,
    stream: int,
) -> torch.Tensor:
    """Evaluate a Combination; zero coefficients were dropped on the host, so only the live terms run."""
    out = x * c.x if c.x != 1.0 else x
    for j, coef in enumerate(c.denoised):
        if coef != 0.0:
            out = torch.add(out, history[-1 - j], alpha=coef)
    if c.raw != 0.0:
        out = torch.add(out, raw, alpha=c.raw)
    if c.noise != 0.0:
        out = torch.add(out, gaussian(seeds, stream, x.shape[1:], x.dtype), alpha=c.noise)
    return out


def run_plan(
    plan: Plan,
    denoise: Denoise,
    x: torch.Tensor,
    seeds: torch.Tensor,
    postprocess: Postprocess | None = None,
) -> torch.Tensor:
    """Run every stage of `plan` from the initial state x [B, ...]; returns the final sample [B, ...].

    seeds: int64 [B], one per sample; stage k draws its noise from streams 2k (point) and 2k + 1 (update).
    """
    history: list[torch.Tensor] = []  # post-processed denoised estimates, newest last
    raw = None
    for k, stage in enumerate(plan.stages):
        point = x if stage.point is None else combine(stage.point, x, history, raw, seeds, 2 * k)
        raw = denoise(point, k)
        history = [*history, raw if postprocess is None else postprocess(raw)][-plan.history:]
        if stage.update is not None:
            x = combine(stage.update, x, history, raw, seeds, 2 * k + 1)
    return x * plan.output_scale if plan.output_scale != 1.0 else x
