"""The sampling loop: a dumb interpreter of a Plan (ARCHITECTURE.md contract 3).

No `.item()`, no data-dependent branches, no progress bar: every decision was taken on the host when the plan was
built, so the whole N-step loop can be captured in one CUDA graph or compiled with `fullgraph=True`. `PlanRun`
runs one stage at a time (one CUDA graph per step, blitzdiff.engine.runtime); `run_plan` runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .denoiser import Denoiser
from .fused_step import (
    FusedStage,
    draw_noise,
    fused_plan,
    resolve_step_backend,
    run_constants,
    run_fused,
    run_point,
    unshared,
)
from .noise import gaussian
from .plan import Combination, Plan, Stage

Denoise = Callable[[torch.Tensor, int], torch.Tensor]  # (point [B, ...], stage index) -> denoised [B, ...]
Postprocess = Callable[[torch.Tensor], torch.Tensor]  # x0 -> clipped / thresholded x0
# scope(stage index, "network" | "solver") -> a context manager around that part of the stage, e.g. a
# torch.profiler.record_function range (blitzdiff.profiling); None in the fast paths.
Scope = Callable[[int, str], AbstractContextManager]
FUSED_RANGE = "blitzdiff::fused_step"  # what a profile calls a fused stage's kernel call


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


class PlanRun:
    """The loop's state while it interprets `plan` from the initial state x [B, ...].

    seeds: int64 [B], one per sample; stage k draws its noise from streams 2k (point) and 2k + 1 (update).
    noise_backend: "ref", "cpu" or "cuda" (blitzdiff.engine.noise.gaussian); "ref" stays plain tensor ops, what
    torch.compile fuses best and export sees. step_backend: "ref" (the Denoiser's and `combine`'s torch ops) or
    "cpu" (guidance, preconditioning and update in one kernel call where a stage allows it: blitzdiff.engine.
    fused_step; float32 / float64 CPU tensors, `denoise` a Denoiser, an eager loop) or "auto" ("cpu" where it can).
    Tensors are never mutated in place: a stage only rebinds x and the histories, so the tensors one captured stage
    leaves behind are the static inputs of the next. The one exception, in fused CPU runs: where the state x is a
    buffer this run's kernel wrote and nothing but the loop references it (`unshared`: not the network, a callback, a
    view or a history), the kernel writes x_next over it, element by element after reading it. A run's state then
    lives in one buffer: an update reads its inputs and writes back lines already in the cache, where a new buffer
    costs a read for ownership of each line and a larger cache footprint (an 8x4x64x64 DDIM step 13.5 -> 9 us).
    """

    def __init__(self, plan: Plan, denoise: Denoise, x: torch.Tensor, seeds: torch.Tensor,
                 postprocess: Postprocess | None = None, noise_backend: str = "ref", scope: Scope | None = None,
                 step_backend: str = "ref"):
        # the noise follows the seeds' device; the fused kernels read raw pointers
        if not (seeds.is_cpu and x.is_cpu) and seeds.device != x.device:
            raise ValueError(f"seeds are on {seeds.device} but the state x is on {x.device}; put both on one device "
                             "(blitzdiff.engine.noise.seed_tensor(seeds, batch, x.device))")
        if seeds.shape != (x.shape[0],):  # row i's noise is a function of seeds[i]: one seed per sample
            raise ValueError(f"seeds must hold one seed per sample, shape ({x.shape[0]},) for the state x of shape "
                             f"{tuple(x.shape)}, got {tuple(seeds.shape)} (blitzdiff.engine.noise.seed_tensor)")
        self.plan, self.denoise, self.x, self.seeds = plan, denoise, x, seeds
        self.postprocess, self.noise_backend, self.scope = postprocess, noise_backend, scope
        self.history: list[torch.Tensor] = []  # post-processed denoised estimates, newest last
        self.points: list[torch.Tensor] = []  # where each of them was evaluated
        self.raw: torch.Tensor | None = None
        self.depth = plan.history
        self.ours = False  # whether x is a kernel output of this run (which it may write again)
        # x0 post-processing (clip, thresholding) runs between the network and the update: not fused
        fuse = resolve_step_backend(step_backend, x.device, x.dtype) == "cpu" and isinstance(denoise, Denoiser) and \
            postprocess is None
        fused = fused_plan(plan, denoise) if fuse else None
        self.fused = fused.stages if fuse else [None] * len(plan.stages)
        self.fused_points = fused.points if fuse else [None] * len(plan.stages)
        # Whether every tensor the loop holds (x, histories, points, noise) is contiguous of x's dtype, so that a
        # fused stage checks only the network's output: true of the kernel's outputs (like x) and of `combine`'s
        # ops on such tensors; a stage run by the Denoiser's ops (on an output of any layout or dtype) rechecks.
        self.plain = fuse and x.is_contiguous()
        # Whether a fused stage must record its estimate and point: not where no stage reads an earlier stage's
        # (DDIM, Euler, ...; a stage run by the Denoiser's ops records its own, which its update reads). Its point
        # only where a stage reads an earlier point (UniPC, ...): a point that is x would keep x from being updated
        # in place.
        self.histories = fuse and fused.histories
        self.points_read = fuse and fused.points_read
        self.constants = run_constants(denoise, x, fused.kernel) if fuse else None

    def _combine(self, c: Combination, stream: int) -> torch.Tensor:
        return combine(c, self.x, self.history, self.points, self.raw, self.seeds, stream, self.noise_backend)

    def stage(self, k: int) -> None:
        """Run stage k: evaluate the denoiser at its point, then update the state."""
        stage, fused = self.plan.stages[k], self.fused[k]
        if self.scope is not None:
            return self._scoped_stage(stage, k, fused)
        # the fast path, flat: no context managers, few calls (an eager loop pays each at every stage)
        if fused is None:
            point = self.x if stage.point is None else self._point(stage.point, k)
            return self._record(stage, k, self.denoise(point, k), point)
        if stage.point is None:  # evaluated at x, which no local names: self.x may be its only reference
            return self._update_fused(stage, k, fused, self.denoise.network(self.x, k), None)
        point = self._point(stage.point, k)
        self._update_fused(stage, k, fused, self.denoise.network(point, k), point)

    def _scoped_stage(self, stage: Stage, k: int, fused: FusedStage | None) -> None:
        """stage(k) with the profiler's ranges: the point and update as "solver", the network call as "network"."""
        scope = self.scope
        with scope(k, "solver"):
            point = None if stage.point is None else self._point(stage.point, k)  # None: x (see stage)
        with scope(k, "network"):
            out = self.denoise(self.x if point is None else point, k) if fused is None else \
                self.denoise.network(self.x if point is None else point, k)
        with scope(k, "solver"):
            if fused is None:
                return self._record(stage, k, out, self.x if point is None else point)
            self._update_fused(stage, k, fused, out, point)

    def _point(self, c: Combination, k: int) -> torch.Tensor:
        """Stage k's evaluation point (its combination c): one kernel pass where the plan fuses it and the loop's
        tensors are plain, else `combine`'s ops."""
        fused = self.fused_points[k]
        if fused is None or not self.plain:
            return self._combine(c, 2 * k)
        noise = draw_noise(self.seeds, 2 * k, self.x, self.noise_backend) if fused.noise else None
        return run_point(fused, k, self.constants, self.x, self.history, self.points, noise)

    def _update_fused(self, stage: Stage, k: int, fused: FusedStage, out: torch.Tensor,
                      point: torch.Tensor | None) -> None:
        """The update of a fused stage from the network output `out` at `point` (None: x): one kernel call where
        it takes `out`, writing x_next over x where x is this run's and unshared (see PlanRun)."""
        # x, unless it is about to be remembered as this stage's point; checked before any local names it
        buffer = self.x if self.ours and not (point is None and self.points_read) and unshared(self.x) else None
        point = self.x if point is None else point
        noise = draw_noise(self.seeds, 2 * k + 1, self.x, self.noise_backend) if fused.noise else None
        if self.scope is None:
            result = run_fused(fused, k, self.constants, self.denoise, out, self.x, point, self.history,
                               self.points, noise, self.plain, buffer)
        else:  # profiled: the kernel is not a torch op, so it gets a range of its own that the op tables list
            with torch.profiler.record_function(FUSED_RANGE):
                result = run_fused(fused, k, self.constants, self.denoise, out, self.x, point, self.history,
                                   self.points, noise, self.plain, buffer)
        if result is None:  # a network output the kernel does not take: the Denoiser's ops
            return self._record(stage, k, self.denoise.precondition(self.denoise.guide(out), point, k), point)
        self.raw, self.x = result
        self.ours = True
        if self.histories:
            self._remember(self.raw, point if self.points_read else None)

    def _record(self, stage: Stage, k: int, raw: torch.Tensor, point: torch.Tensor) -> None:
        """The end of a stage run by the Denoiser's and `combine`'s ops, from its denoised estimate `raw`."""
        self.raw, self.ours = raw, False
        clean = raw if self.postprocess is None else self.postprocess(raw)
        self._remember(clean, point)
        if stage.update is not None:
            self.x = self._combine(stage.update, 2 * k + 1)
        if self.plain:
            dtype = point.dtype
            self.plain = clean.dtype is dtype and clean.is_contiguous() and self.x.dtype is dtype and \
                self.x.is_contiguous()

    def _remember(self, estimate: torch.Tensor | None, point: torch.Tensor) -> None:
        """Append a stage's (post-processed) estimate and its point to the histories, keeping the newest `depth`."""
        self.history = [*self.history, estimate][-self.depth:]
        self.points = [*self.points, point][-self.depth:]

    def output(self) -> torch.Tensor:
        """The final sample [B, ...] (after every stage ran)."""
        scale = self.plan.output_scale
        return self.x * scale if scale != 1.0 else self.x


def run_plan(
    plan: Plan,
    denoise: Denoise,
    x: torch.Tensor,
    seeds: torch.Tensor,
    postprocess: Postprocess | None = None,
    noise_backend: str = "ref",
    scope: Scope | None = None,
    step_backend: str = "ref",
) -> torch.Tensor:
    """Run every stage of `plan` from the initial state x [B, ...]; returns the final sample [B, ...] (see PlanRun)."""
    run = PlanRun(plan, denoise, x, seeds, postprocess, noise_backend, scope, step_backend)
    for k in range(len(plan.stages)):
        run.stage(k)
    return run.output()
