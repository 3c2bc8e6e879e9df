"""The fused solver step in Triton: guidance, preconditioning and the plan's linear update in one elementwise pass.

Same contract as csrc/solver_step.h: `terms` are the live terms of the update in the sampling loop's order, each a
tensor or None for the new denoised (D_0); half types compute in float32, float32 / float64 in their own precision.
Scalars are declared float64 and rounded once to the compute type inside the kernel (Triton would otherwise pass a
Python float as float32, which float64 cannot afford). Up to 10 term slots are unrolled at compile time; unused
slots receive a placeholder pointer that is never read. Imported only when the "triton" backend is asked for;
blitzdiff.kernels.solver_step checks the inputs first.
"""

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreted

MAX_TERMS = 10


@triton.jit
def _term(acc, ptr, coef, offs, mask, d, IS_D0: tl.constexpr):
    if IS_D0:
        value = d
    else:
        value = tl.load(ptr + offs, mask=mask).to(acc.dtype)
    return acc + coef * value


@triton.jit
def _solver_step(
    den_ptr, next_ptr, out_ptr, point_ptr,
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9,
    c0: tl.float64, c1: tl.float64, c2: tl.float64, c3: tl.float64, c4: tl.float64,
    c5: tl.float64, c6: tl.float64, c7: tl.float64, c8: tl.float64, c9: tl.float64,
    n, c_skip: tl.float64, c_out: tl.float64, w: tl.float64,
    GUIDED: tl.constexpr, SKIP: tl.constexpr, N_TERMS: tl.constexpr, D0_SLOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    zero = tl.zeros([BLOCK], ACC)  # `zero + scalar` rounds a float64 scalar to ACC (the interpreter's way too)
    g = tl.load(out_ptr + offs, mask=mask).to(ACC)
    if GUIDED:  # out = [u; c]: g = u + w * (c - u)
        g = g + (zero + w).to(ACC) * (tl.load(out_ptr + n + offs, mask=mask).to(ACC) - g)
    if SKIP:
        p = tl.load(point_ptr + offs, mask=mask).to(ACC)
        d = p * (zero + c_skip).to(ACC) + (zero + c_out).to(ACC) * g
    else:
        d = g * (zero + c_out).to(ACC)
    stored = d.to(den_ptr.dtype.element_ty)
    tl.store(den_ptr + offs, stored, mask=mask)
    d = stored.to(ACC)  # the D_0 term reads the denoised value as stored
    acc = zero
    if N_TERMS > 0:
        acc = _term(acc, t0, (zero + c0).to(ACC), offs, mask, d, D0_SLOT == 0)
    if N_TERMS > 1:
        acc = _term(acc, t1, (zero + c1).to(ACC), offs, mask, d, D0_SLOT == 1)
    if N_TERMS > 2:
        acc = _term(acc, t2, (zero + c2).to(ACC), offs, mask, d, D0_SLOT == 2)
    if N_TERMS > 3:
        acc = _term(acc, t3, (zero + c3).to(ACC), offs, mask, d, D0_SLOT == 3)
    if N_TERMS > 4:
        acc = _term(acc, t4, (zero + c4).to(ACC), offs, mask, d, D0_SLOT == 4)
    if N_TERMS > 5:
        acc = _term(acc, t5, (zero + c5).to(ACC), offs, mask, d, D0_SLOT == 5)
    if N_TERMS > 6:
        acc = _term(acc, t6, (zero + c6).to(ACC), offs, mask, d, D0_SLOT == 6)
    if N_TERMS > 7:
        acc = _term(acc, t7, (zero + c7).to(ACC), offs, mask, d, D0_SLOT == 7)
    if N_TERMS > 8:
        acc = _term(acc, t8, (zero + c8).to(ACC), offs, mask, d, D0_SLOT == 8)
    if N_TERMS > 9:
        acc = _term(acc, t9, (zero + c9).to(ACC), offs, mask, d, D0_SLOT == 9)
    tl.store(next_ptr + offs, acc.to(next_ptr.dtype.element_ty), mask=mask)


def solver_step(
    denoised: torch.Tensor, x_next: torch.Tensor, out: torch.Tensor, point: torch.Tensor, guided: bool,
    c_skip: float, c_out: float, guidance_scale: float, terms: list[torch.Tensor | None], coefs: list[float],
) -> None:
    """Write the denoised estimate and the next state into `denoised` / `x_next` (contiguous, like `point`).

    out: contiguous, n elements ([u; c], 2n, when guided); terms: at most MAX_TERMS, None for D_0.
    """
    n = point.numel()
    assert len(terms) == len(coefs) <= MAX_TERMS
    d0 = [k for k, t in enumerate(terms) if t is None]
    slots = [point if t is None else t for t in terms] + [point] * (MAX_TERMS - len(terms))
    scalars = [float(c) for c in coefs] + [0.0] * (MAX_TERMS - len(coefs))
    block = 4096 if triton_interpreted() else 1024  # the interpreter: fewer, larger programs
    acc = tl.float64 if point.dtype == torch.float64 else tl.float32
    _solver_step[(triton.cdiv(n, block),)](
        denoised, x_next, out, point, *slots, *scalars, n, float(c_skip), float(c_out), float(guidance_scale),
        GUIDED=guided, SKIP=c_skip != 0.0, N_TERMS=len(terms), D0_SLOT=d0[0] if d0 else -1, ACC=acc, BLOCK=block,
    )
