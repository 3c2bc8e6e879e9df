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
    points: list[torch.Tensor],
    raw: torch.Tensor | None,
    seeds: torch.Tensor,
    stream: int,
    noise_backend: str = "ref",
) -> torch.Tensor:
    """Evaluate a Combination. Terms with a zero coefficient are skipped on the host (a zero is never multiplied,
    so an infinite or unused tensor cannot leak NaN into the result); the noise is drawn only when used."""
    terms = [
        (c.x, x),
        *((coef, history[-1 - j]) for j, coef in enumerate(c.denoised)),
        *((coef, points[-1 - j]) for j, coef in enumerate(c.points)),
        (c.raw, raw),
    ]
    if c.noise != 0.0:
        terms.append((c.noise, gaussian(seeds, stream, x.shape[1:], x.dtype, backend=noise_backend)))
    live = [(coef, tensor) for coef, tensor in terms if coef != 0.0]
    if not live:
        return torch.zeros_like(x)
    first_coef, out = live[0]
    out = out * first_coef if first_coef != 1.0 else out
    for coef, tensor in live[1:]:
        out = torch.add(out, tensor, alpha=coef)
    return out


def run_plan(
    plan: Plan,
    denoise: Denoise,
    x: torch.Tensor,
    seeds: torch.Tensor,
    postprocess: Postprocess | None = None,
    noise_backend: str = "ref",
) -> torch.Tensor:
    """Run every stage of `plan` from the initial state x [B, ...]; returns the final sample [B, ...].

    seeds: int64 [B], one per sample; stage k draws its noise from streams 2k (point) and 2k + 1 (update).
    noise_backend: "ref", "cpu" or "cuda" (blitzdiff.engine.noise.gaussian); "ref" stays plain tensor ops, what
    torch.compile fuses best and export sees.
    """
    history: list[torch.Tensor] = []  # post-processed denoised estimates, newest last
    points: list[torch.Tensor] = []  # where each of them was evaluated (tensors are never mutated: no copies)
    raw = None
    depth = plan.history
    for k, stage in enumerate(plan.stages):
        point = x if stage.point is None else combine(stage.point, x, history, points, raw, seeds, 2 * k, noise_backend)
        raw = denoise(point, k)
        history = [*history, raw if postprocess is None else postprocess(raw)][-depth:]
        points = [*points, point][-depth:]
        if stage.update is not None:
            x = combine(stage.update, x, history, points, raw, seeds, 2 * k + 1, noise_backend)
    return x * plan.output_scale if plan.output_scale != 1.0 else x
