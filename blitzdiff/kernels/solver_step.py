"""Fused solver step: classifier-free guidance, the denoiser's preconditioning and a plan stage's linear update in
one pass over memory (ARCHITECTURE.md contracts 1, 2 and 5).

For a plan stage whose update uses the newest denoised estimate and no x0 post-processing (clip / threshold are
not fused), the sampling loop computes, from the network output `out` at the stage's evaluation point:

    g        = u + w * (c - u)  with [u; c] = out   (guided, blitzdiff.engine.denoiser.Denoiser)   or   g = out
    denoised = c_skip * point + c_out * g            (g * c_out when c_skip == 0)
    x_next   = a * x + sum_j b_j * D_j + sum_j p_j * P_j + s * noise  (blitzdiff.engine.sampler.combine)

with D_0 = denoised, D_1.. the older estimates, P_0 the evaluation point (x itself for stages without a point
combination), P_1.. the older points. `solver_step_ref` is that computation in the loop's own torch ops and order
(zero coefficients skipped, terms summed left to right), so in float32 / float64 it equals the loop to rounding;
the "cpu", "cuda" and "triton" backends do it in one pass (one kernel for the 8 eager ops and 6 intermediate
tensors of a guided DPM-Solver++(2M) stage). Plan combinations map onto it as (a, b, p, s) = (c.x, c.denoised, c.points,
c.noise); the stage's noise is drawn by the caller. One `torch.library` op, `blitzdiff::solver_step`, covers all
backends; "auto" picks the fastest one built for the tensors' device and dtype, per call.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backends import DTYPE_NAMES, check_backend, check_kernel_support, choose_backend, device_guard, refuse_grad
from ._library import define, launch

BACKENDS = ("ref", "cpu", "cuda", "triton", "auto")
# dtypes the compiled kernels take; "ref" takes any floating dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
MAX_HISTORY = 3  # older denoised estimates D_1 .. D_3 (DPM-Solver++(3M), UniPC-3's corrector)
MAX_POINTS = 4  # points P_0 .. P_3 (UniPC-3 with predict_x0=False reads four noise estimates)
_HALF = (torch.float16, torch.bfloat16)


def solver_step_ref(
    out: Tensor, x: Tensor, point: Tensor | None, history: Sequence[Tensor], points: Sequence[Tensor],
    noise: Tensor | None, c_skip: float, c_out: float, guidance_scale: float, a: float, b: Sequence[float],
    p: Sequence[float], s: float,
) -> tuple[Tensor, Tensor]:
    """(denoised, x_next) of one plan stage, in the sampling loop's ops and order. The specification.

    out: [B, ...] or, guided, [2B, ...] = [uncond; cond]; x: the state [B, ...]; point: the evaluation point (None:
    x); history: D_1, D_2, .. (newest first); points: P_0, P_1, .. (P_0 the evaluation point); b: b_0 .. (one more
    than history); p: one per point. float16 / bfloat16 compute in float32: the denoised estimate is rounded once
    to the input dtype (and enters x_next as rounded), x_next once at the end.
    """
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    point = x if point is None else point
    g = out.to(acc)
    if out.shape[0] != x.shape[0]:  # guided: [uncond; cond]
        u, c = g.chunk(2)
        g = u + guidance_scale * (c - u)
    px = point.to(acc)
    denoised = torch.add(px * c_skip, g, alpha=c_out) if c_skip != 0.0 else g * c_out
    denoised = denoised.to(x.dtype)
    terms = [(a, x), (b[0], denoised), *zip(b[1:], history, strict=True), *zip(p, points, strict=True), (s, noise)]
    x_next = None
    for coef, t in terms:
        if coef == 0.0:  # skipped, as the loop does: an unused (even non-finite) tensor never reaches the sum
            continue
        x_next = t.to(acc) * coef if x_next is None else torch.add(x_next, t.to(acc), alpha=coef)
    return denoised, (torch.zeros_like(x) if x_next is None else x_next.to(x.dtype))


def _check_inputs(
    out: Tensor, x: Tensor, point: Tensor | None, history: Sequence[Tensor], points: Sequence[Tensor],
    noise: Tensor | None, guidance_scale: float, b: Sequence[float], p: Sequence[float], s: float, backend: str,
) -> None:
    """Raise ValueError naming what is wrong and what is allowed; shared by the real and the fake kernel."""
    check_backend("solver_step", backend, BACKENDS)
    if not x.is_floating_point():
        raise ValueError(f"solver_step: tensors must be floating point, got {x.dtype}")
    rows_ok = out.dim() > 0 and x.dim() > 0 and out.shape[0] in (x.shape[0], 2 * x.shape[0])
    if not rows_ok or out.shape[1:] != x.shape[1:]:
        raise ValueError(f"solver_step: out must be [B, ...] or, guided, [2B, ...] with x = [B, ...]; got out "
                         f"{tuple(out.shape)} and x {tuple(x.shape)}")
    if out.shape[0] == x.shape[0] and guidance_scale != 1.0:
        raise ValueError(f"solver_step: guidance_scale={guidance_scale} needs out = [uncond; cond] ([2B, ...] = "
                         f"[{2 * x.shape[0]}, ...]), got out {tuple(out.shape)}; pass 1.0 for an unguided output")
    if not 1 <= len(b) <= MAX_HISTORY + 1 or len(b) != len(history) + 1:
        raise ValueError(f"solver_step: b holds b_0 and one coefficient per history tensor (at most "
                         f"{MAX_HISTORY}); got {len(b)} coefficients for {len(history)} history tensors")
    if len(p) != len(points) or len(points) > MAX_POINTS:
        raise ValueError(f"solver_step: p needs one coefficient per point tensor (at most {MAX_POINTS}); got "
                         f"{len(p)} coefficients for {len(points)} points")
    if noise is None and s != 0.0:
        raise ValueError(f"solver_step: noise is None but its coefficient s is {s}; pass noise or s=0.0")
    named = [("out", out), ("point", point), ("noise", noise)]
    named += [(f"history[{j}]", t) for j, t in enumerate(history)] + [(f"points[{j}]", t) for j, t in enumerate(points)]
    for name, t in named:
        if t is None:
            continue
        if t is not out and t.shape != x.shape:
            raise ValueError(f"solver_step: {name}.shape {tuple(t.shape)} differs from x.shape {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"solver_step: {name}.dtype {t.dtype} differs from x.dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"solver_step: {name} is on {t.device} but x is on {x.device}")
    check_kernel_support("solver_step", backend, x.device, x.dtype, KERNEL_DTYPES)


def _solver_step_kernel(
    out: Tensor, x: Tensor, point: Tensor | None, history: list[Tensor], points: list[Tensor], noise: Tensor | None,
    c_skip: float, c_out: float, guidance_scale: float, a: float, b: list[float], p: list[float], s: float, *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    _check_inputs(out, x, point, history, points, noise, guidance_scale, b, p, s, backend)
    if backend == "auto":
        backend = choose_backend(x.device, x.dtype, KERNEL_DTYPES, ("cuda", "triton", "cpu"), out, x, point, noise,
                                 *history, *points)
    if backend == "ref":
        denoised, x_next = solver_step_ref(out, x, point, history, points, noise, c_skip, c_out, guidance_scale,
                                           a, b, p, s)
        return denoised.contiguous(), x_next.contiguous()
    refuse_grad("solver_step", backend, out, x, point, noise, *history, *points)
    # The kernels walk flat memory: inputs dense, outputs fresh (never aliasing an input).
    dense = torch.Tensor.contiguous
    out, x = dense(out), dense(x)
    point = x if point is None else dense(point)
    # The live terms in the loop's order; None stands for the new denoised estimate (D_0), zeros are dropped.
    terms = [(a, x), (b[0], None), *zip(b[1:], history, strict=True), *zip(p, points, strict=True), (s, noise)]
    live = [(float(coef), None if t is None else dense(t)) for coef, t in terms if coef != 0.0]
    denoised = torch.empty_like(x, memory_format=torch.contiguous_format)
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    guided = out.shape[0] != x.shape[0]
    if x.numel() == 0:
        return denoised, x_next
    if backend == "triton":
        from .triton import solver_step as triton_kernel  # lazy: triton is optional

        with device_guard(x.device):
            triton_kernel.solver_step(denoised, x_next, out, point, guided, c_skip, c_out, guidance_scale,
                                      [t for _, t in live], [coef for coef, _ in live])
        return denoised, x_next
    launch("solver_step", backend, x.device, denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(), point.data_ptr(),
           x.numel(), guided, DTYPE_NAMES[x.dtype], c_skip, c_out, guidance_scale,
           [0 if t is None else t.data_ptr() for _, t in live], [coef for coef, _ in live], threaded=True)
    return denoised, x_next


def _solver_step_fake(
    out: Tensor, x: Tensor, point: Tensor | None, history: list[Tensor], points: list[Tensor], noise: Tensor | None,
    c_skip: float, c_out: float, guidance_scale: float, a: float, b: list[float], p: list[float], s: float, *,
    backend: str,
) -> tuple[Tensor, Tensor]:
    _check_inputs(out, x, point, history, points, noise, guidance_scale, b, p, s, backend)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


_solver_step_op = define(
    "solver_step(Tensor out, Tensor x, Tensor? point, Tensor[] history, Tensor[] points, Tensor? noise, "
    "float c_skip, float c_out, float guidance_scale, float a, float[] b, float[] p, float s, *, str backend) "
    "-> (Tensor, Tensor)",
    _solver_step_kernel,
    _solver_step_fake,
)


def solver_step(
    out: Tensor,
    x: Tensor,
    *,
    c_skip: float,
    c_out: float,
    guidance_scale: float = 1.0,
    a: float,
    b: Sequence[float],
    history: Sequence[Tensor] = (),
    p: Sequence[float] = (),
    points: Sequence[Tensor] = (),
    s: float = 0.0,
    noise: Tensor | None = None,
    point: Tensor | None = None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(denoised, x_next) of one plan stage by `backend` ("auto", "ref", "cpu", "cuda" or "triton"):
    `blitzdiff::solver_step`. See the module docstring for the formulas; `solver_step_ref` is the specification.

    out: the network output [B, ...], or [2B, ...] = [uncond; cond] when guided (then guidance_scale is w; an
    unguided out needs guidance_scale 1.0). x: the state [B, ...]; point: where the network was evaluated (None:
    x). b = (b_0, b_1, ..) for (new denoised, history[0], ..), at most 3 history tensors; p for points (P_0 the
    evaluation point), at most 4; s for noise (None when s is 0.0). All tensors share x's dtype and device;
    non-contiguous ones are copied to contiguous ones first. "cpu" takes float32 / float64, "cuda" and "triton"
    also float16 / bfloat16 (CUDA tensors, or CPU ones under TRITON_INTERPRET=1); "auto" picks the fastest of these
    for the call, and "ref" where none can take it (or gradients are needed). Returns two new tensors shaped like x,
    contiguous from the op. "ref" runs the spec's PyTorch ops themselves, not the op (export, autograd and
    torch.compile's fusion see ordinary ops), so its results are laid out as those ops lay them out.
    """
    if backend == "ref":
        _check_inputs(out, x, point, history, points, noise, guidance_scale, b, p, s, backend)
        return solver_step_ref(out, x, point, history, points, noise, c_skip, c_out, guidance_scale, a, b, p, s)
    return _solver_step_op(out, x, point, list(history), list(points), noise, c_skip, c_out, guidance_scale, a,
                           [float(v) for v in b], [float(v) for v in p], s, backend=backend)
