"""Fused stages for the sampling loop: classifier-free guidance, the denoiser's preconditioning and a plan stage's
update in one pass over memory, by the "cpu" kernel of blitzdiff.kernels.solver_step (ARCHITECTURE.md contracts
2, 3 and 5).

A stage runs fused when it has an update, no x0 post-processing runs between the network and the update (clip and
dynamic thresholding are not fused) and its live terms fit the kernel; every other stage runs the Denoiser and
`combine` as before. A stage's evaluation point (the combination UniPC's, Heun's and the singlestep solvers'
stages evaluate the network at) is one pass of the same kernel's sum where its terms fit, instead of `combine`'s one
op per term (8x4x64x64 UniPC: 91 -> 59 us a step, README "Scheduler overhead"). The kernel gets the
terms in `combine`'s order (x, D_j, P_j, noise; zero coefficients dropped) and the scalars the Denoiser uses, so a
fused run equals the unfused loop to rounding (tests/engine/test_fused_step.py: 1e-12 relative in float64, float32
within the rounding of the ops it replaces). The kernel
applies the guidance scale, whether a number or a float32 CPU tensor: a 0-d scalar, or one per sample (what the
Pipeline's runtime passes), read by the kernel from memory per call; a scale of another dtype or device is applied
by the Denoiser's own ops first, and the kernel does the rest.

Why not through the op `blitzdiff::solver_step`: the op validates every argument on every call (about 20 us on small
CPU tensors: more than the five ops of a DPM-Solver++ stage it replaces). Within one loop the shapes, dtype and
device of the state, its histories and its noise never change, so the stages are prepared once: their scalars and
coefficients once per plan (Plan.memo) in a `blitzdiff._C.SolverStepPlan`, what a run adds (size, dtype, guidance,
threads) once per run in a `SolverStepRun`, and a stage's call passes only its pointers (`_C.solver_step_stage`:
0.14 us a call with an empty state, against 0.55 us for `solver_step_cpu`'s 15 arguments). Per call only the
tensors' dtype and layout are looked at. Eager only (`PlanRun` with step_backend
"cpu"): torch.compile and export trace `combine`'s plain ops, which inductor fuses by itself, and CUDA graphs keep
the "ref" path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..kernels._backends import backend_installed
from ..kernels._library import native
from .denoiser import Denoiser
from .noise import gaussian
from .plan import Combination, Plan

STEP_BACKENDS = ("auto", "ref", "cpu")
MAX_TERMS = 10  # csrc/solver_step.h: kMaxSolverStepTerms
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_NEW = ("new", 0)  # the term that reads the stage's own denoised estimate (the kernel's null pointer)


def resolve_step_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"ref" (the loop's torch ops) or "cpu" (fused stages). "auto": "cpu" for float32 / float64 CPU tensors when
    blitzdiff._C is built, else "ref"; "cpu" must suit device and dtype."""
    if backend not in STEP_BACKENDS:
        raise ValueError(f"unknown step_backend {backend!r}; allowed: {', '.join(STEP_BACKENDS)}")
    fits = device.type == "cpu" and dtype in _DTYPES
    if backend == "auto":
        return "cpu" if fits and backend_installed("cpu") else "ref"
    if backend == "cpu" and not fits:
        raise ValueError(f"step_backend 'cpu' takes float32 or float64 CPU tensors, got {dtype} on {device}; use "
                         "'auto' or 'ref'")
    return backend


class FusedStage(NamedTuple):  # a tuple: built for every stage of a plan, at a fraction of a dataclass's cost
    """One stage's kernel call: the Denoiser's scalars and the update's live terms, each a (source, index) into the
    loop's tensors: ("x", 0), ("new", 0) the new denoised estimate, ("history", j) / ("points", j) the j-th newest
    before this stage (j >= 1), ("point", 0) this stage's evaluation point, ("noise", 0)."""

    c_skip: float
    c_out: float
    sources: tuple[tuple[str, int], ...]
    coefs: tuple[float, ...]
    kernel: Callable  # blitzdiff._C.solver_step_stage, looked up once per plan
    noise: bool  # whether a term reads fresh noise (the caller draws it)
    store: bool  # whether a later stage reads this stage's denoised estimate; if not, it is never written


class FusedPoint(NamedTuple):
    """One stage's evaluation point computed by the kernel (the loop's point combination, before the network call):
    its live terms as FusedStage.sources (no ("new", 0) or ("point", 0): the point reads x, the histories and
    noise)."""

    sources: tuple[tuple[str, int], ...]
    coefs: tuple[float, ...]
    kernel: Callable  # blitzdiff._C.solver_point_stage
    noise: bool  # whether a term reads fresh noise (the caller draws it, stream 2k as `combine`)


class FusedPlan(NamedTuple):
    """What the loop derives from a plan (and the Denoiser's scalars) to run it fused: fused_plan."""

    stages: list[FusedStage | None]  # per stage, its FusedStage or None (run unfused)
    points: list[FusedPoint | None]  # per stage, its FusedPoint or None (no point combination, or run by `combine`)
    kernel: object  # the kernel's copy: a blitzdiff._C.SolverStepPlan of each fused stage's scalars and coefficients
    histories: bool  # whether a stage reads an earlier stage's denoised estimate or point: the loop keeps them
    points_read: bool  # whether a stage reads an earlier stage's point: the loop keeps points too


def fused_plan(plan: Plan, denoiser: Denoiser) -> FusedPlan:
    """The plan's FusedPlan for the Denoiser's scalars, made once (Plan.memo): plans are shared by every run of a
    sampler. Not per guidance scale, which run_constants reads from the Denoiser: a server's requests may bring any
    number of scales. Where x0 is post-processed nothing is fused (fused_stages)."""
    return plan.memo(("fused_plan", denoiser.scalars_key), lambda: _fused_plan(plan, denoiser.scalars))


def fused_stages(plan: Plan, denoiser: Denoiser, postprocess: object | None) -> list[FusedStage | None]:
    """Per stage, its FusedStage, or None where it runs unfused (no update, a D_raw term, or more live terms than
    the kernel takes); all None when x0 is post-processed."""
    if postprocess is not None:
        return [None] * len(plan.stages)
    return fused_plan(plan, denoiser).stages


def _fused_plan(plan: Plan, scalars: Sequence) -> FusedPlan:
    extension = native("solver_step", "cpu")
    read = _read_later(plan)
    stages: list[FusedStage | None] = []
    for stage, c, store in zip(plan.stages, scalars, read, strict=True):
        live = _live_terms(stage.update, before=0)
        stages.append(None if live is None else FusedStage(c.c_skip, c.c_out, *live, extension.solver_step_stage,
                                                           ("noise", 0) in live[0], store))
    points: list[FusedPoint | None] = []
    for stage in plan.stages:
        live = _live_terms(stage.point, before=1)
        points.append(None if live is None else FusedPoint(*live, extension.solver_point_stage,
                                                           ("noise", 0) in live[0]))
    kernel = extension.SolverStepPlan([None if f is None else (f.c_skip, f.c_out, list(f.coefs)) for f in stages],
                                      [None if f is None else list(f.coefs) for f in points])
    points_read = reads_earlier_points(plan)
    return FusedPlan(stages, points, kernel, points_read or any(read), points_read)


def _read_later(plan: Plan) -> list[bool]:
    """Per stage k, whether a later stage's point or update reads its denoised estimate D_k: stage m's point sees
    D_{m-1-j} as its denoised[j] and D_{m-1} as its D_raw (before m's own joins the history), m's update D_{m-j}
    (and its own D_raw, which the kernel reads as it computes it)."""
    read = [False] * len(plan.stages)
    for m, stage in enumerate(plan.stages):
        for c, newest in ((stage.point, m - 1), (stage.update, m)):
            if c is None:
                continue
            for j, coef in [*enumerate(c.denoised), (0, c.raw)]:
                if coef != 0.0 and newest - j != m:
                    read[newest - j] = True
    return read


def reads_earlier_points(plan: Plan) -> bool:
    """Whether a stage reads an earlier stage's evaluation point (UniPC, ...; not DDIM, Euler or DPM-Solver++(2M)):
    the loop must then keep the points. A point combination's P_j is P_{m-1-j}; an update's P_j, j >= 1, is P_{m-j}."""

    def reads_earlier_point(stage) -> bool:
        point = stage.point is not None and any(coef != 0.0 for coef in stage.point.points)
        return point or (stage.update is not None and any(coef != 0.0 for coef in stage.update.points[1:]))

    return any(reads_earlier_point(s) for s in plan.stages)


def _live_terms(c: Combination | None, before: int) -> tuple[tuple, tuple] | None:
    """(sources, coefficients) of a stage's update (before = 0) or point (before = 1) for the kernel, or None where
    it has none, reads D_raw (the estimate before post-processing: only plans with post-processing have such terms)
    or has more live terms than the kernel takes."""
    terms = None if c is None or c.raw != 0.0 else _terms(c, before)
    if terms is None or len(terms) > MAX_TERMS:
        return None
    return tuple(zip(*terms, strict=True)) if terms else ((), ())


def _terms(c: Combination, before: int) -> list[tuple[tuple[str, int], float]]:
    """The live terms of a combination (without D_raw) in `combine`'s order. before = 0: a stage's update, whose D_0
    is the stage's new estimate and P_0 its evaluation point; before = 1: a stage's point, whose D_j / P_j are the
    (j+1)-th newest estimate / point before the stage."""
    terms = [(("x", 0), c.x)]
    terms += [(("history", j + before) if j + before else _NEW, coef) for j, coef in enumerate(c.denoised)]
    terms += [(("points", j + before) if j + before else ("point", 0), coef) for j, coef in enumerate(c.points)]
    terms += [(("noise", 0), c.noise)]
    return [(source, coef) for source, coef in terms if coef != 0.0]


class RunConstants(NamedTuple):
    """One run's kernel (run_constants): what every fused stage passes it besides its tensors is bound in it."""

    guide_first: bool  # a scale of another dtype or device: the Denoiser's ops guide, the kernel does the rest
    kernel: object  # the blitzdiff._C.SolverStepRun: what solver_step_stage takes


def run_constants(denoiser: Denoiser, x: torch.Tensor, plan: object) -> RunConstants:
    """The run's kernel for the state x (float32 / float64 on the CPU: resolve_step_backend) and the kernel plan
    `plan` (FusedPlan.kernel). A tensor scale is read by the kernel from memory at every call, so a run keeps its
    pointer, not its values."""
    scale, rows, row_size, guided, guide_first = denoiser.guidance_scale, 0, 0, denoiser.guided, False
    if guided and isinstance(scale, torch.Tensor):  # per sample [B] or one 0-d scale
        if scale.dtype is torch.float32 and scale.is_cpu and scale.numel() in (1, x.shape[0]) and \
                scale.is_contiguous():
            rows, row_size = scale.data_ptr(), x.numel() // scale.numel()
        else:  # another dtype or device
            guided, guide_first = False, True
    number = float(scale) if guided and not rows else 1.0
    kernel = native("solver_step", "cpu").SolverStepRun(plan, x.numel(), _DTYPES[x.dtype], guided, number, rows,
                                                        row_size, torch.get_num_threads())
    return RunConstants(guide_first, kernel)


def run_fused(
    step: FusedStage, k: int, run: RunConstants, denoiser: Denoiser, out: torch.Tensor, x: torch.Tensor,
    point: torch.Tensor, history: Sequence[torch.Tensor | None], points: Sequence[torch.Tensor],
    noise: torch.Tensor | None, plain: bool = False, buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """(denoised, x_next) of fused stage k from the network output `out` (Denoiser.network's), or None when a tensor
    does not suit the kernel: another dtype or device than x (e.g. a half-precision network output), or a loop
    tensor that is not contiguous (e.g. a channels-last initial state); the caller then runs the stage unfused. An
    output in another layout (a convolution network with channels-last weights returns channels-last) is copied
    contiguous first: one pass, where the unfused stage would take five or more. denoised is None where
    no later stage reads it (step.store). run: run_constants(denoiser, x) of the run's initial state (the states
    after it keep its shape, dtype and device). history / points: the loop's, oldest first, before this stage's
    entries; x, point, noise: [B, ...] on the CPU. plain: the caller knows x, point, noise and the histories to be
    contiguous of x's dtype (PlanRun tracks it), so only `out` is checked. buffer: where to write x_next, a contiguous
    tensor like x that nothing else references (unshared): x itself (the kernel reads each element before writing
    it), else None: a new one. Per call this does no more than the
    checks that keep the kernel's pointers valid: it runs once per stage of every eager sampling loop."""
    dtype = x.dtype
    if out.dtype is not dtype or not out.is_cpu:
        return None
    if not plain and (not x.is_contiguous() or point.dtype is not dtype or not point.is_contiguous()):
        return None
    pointers = []  # the terms' data in the kernel's order; 0: the new denoised estimate (the kernel's null pointer)
    for name, j in step.sources:  # a loop, not comprehensions: this runs at every stage (Python 3.11 pays a call each)
        if name == "new":
            pointers.append(0)
            continue
        term = x if name == "x" else point if name == "point" else noise if name == "noise" else \
            (history if name == "history" else points)[-j]
        if not plain and (term.dtype is not dtype or not term.is_contiguous()):
            return None
        pointers.append(term.data_ptr())
    if not out.is_contiguous():  # after the checks: a stage that falls back needs no copy
        out = out.contiguous()
    if run.guide_first:
        out = denoiser.guide(out)
    # contiguous, as x is; an estimate no later stage reads is not stored (None in the loop's history)
    denoised = torch.empty_like(x) if step.store else None
    x_next = torch.empty_like(x) if buffer is None else buffer
    step.kernel(run.kernel, k, 0 if denoised is None else denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(),
                point.data_ptr(), *pointers)
    return denoised, x_next


def run_point(step: FusedPoint, k: int, run: RunConstants, x: torch.Tensor, history: Sequence[torch.Tensor | None],
              points: Sequence[torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor:
    """Stage k's evaluation point, a new tensor like x, from the loop's tensors: the caller knows them to be
    contiguous of x's dtype on the CPU (PlanRun.plain), as the kernel reads them by pointer. history / points: the
    loop's, oldest first, before this stage's entries; noise: drawn by the caller where step.noise."""
    pointers = []
    for name, j in step.sources:  # a loop, not comprehensions: this runs at every stage (see run_fused)
        term = x if name == "x" else noise if name == "noise" else (history if name == "history" else points)[-j]
        pointers.append(term.data_ptr())
    point = torch.empty_like(x)
    step.kernel(run.kernel, k, point.data_ptr(), *pointers)
    return point


def unshared(t: torch.Tensor) -> bool:
    """Whether the caller's attribute is the only reference to tensor t and its memory: no other Python reference
    (getrefcount as for an object held by one attribute alone: _SOLE_REFERENCE), no C++ one to the tensor (a view's
    base, a DLPack capsule) and none to its storage but the tensor's and its Python object's (views, `set_`,
    `.numpy()` arrays). Then writing into t changes nothing anyone can read (tests/engine/test_fused_step.py)."""
    return sys.getrefcount(t) == _SOLE_REFERENCE and t._use_count() == 1 and \
        torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2


def _references(t: object) -> int:
    """sys.getrefcount(t) as unshared reads it (the same call shape)."""
    return sys.getrefcount(t)


class _Holder:
    only: object


def _sole_reference() -> int:
    """What _references reports for an object held by one attribute alone, passed as unshared's argument is: 3 on
    CPython 3.11 (the attribute, the parameter, getrefcount's own argument). Measured rather than assumed, since
    interpreters that borrow references to locals count fewer, and a count assumed too high would let a shared
    tensor pass for unshared."""
    holder = _Holder()
    holder.only = object()
    return _references(holder.only)


_SOLE_REFERENCE = _sole_reference()


def draw_noise(seeds: torch.Tensor, stream: int, like: torch.Tensor, backend: str) -> torch.Tensor:
    """blitzdiff.engine.noise.gaussian(seeds, stream, like.shape[1:], like.dtype, backend=backend): the same bits,
    by a direct call of the "cpu" kernel where the op's per-call checks are known to pass (int64 seeds [B] and a
    float32 / float64 state on the CPU, a stream the plan numbered: 2k + 1 < 2**31), else through `gaussian`."""
    batch = like.shape[0]
    if backend != "cpu" or seeds.dtype is not torch.int64 or not seeds.is_cpu or not seeds.is_contiguous() or \
            seeds.shape[0] != batch:
        return gaussian(seeds, stream, like.shape[1:], like.dtype, backend=backend)
    out = torch.empty_like(like)  # contiguous: the fused path checked like (the state x)
    native("gaussian_noise", "cpu").gaussian_noise_cpu(out.data_ptr(), seeds.data_ptr(), batch,
                                                      out.numel() // batch if batch else 0, stream,
                                                      _DTYPES[out.dtype], torch.get_num_threads())
    return out
