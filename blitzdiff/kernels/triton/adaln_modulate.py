"""adaLN modulation and the gated residual in Triton: one row (token) per program.

adaln_modulate loads its whole row (BLOCK_D = D rounded up to a power of two) once, keeps it in registers for the
float32 two-pass statistics (mean, then the centered sum of squares) and writes LayerNorm(x) * (1 + scale) + shift;
the reciprocal square root is the precise one (sqrt_rn, div_rn). The gated residual walks its row in tiles.
shift / scale / gate rows are `param_stride` elements apart, so chunks of a [B, 6D] modulation vector are read in
place. Imported only when the "triton" backend is asked for; blitzdiff.kernels.adaln_modulate checks the inputs.
"""

import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # the gated residual's row tile


@triton.jit
def _modulate(out_ptr, x_ptr, shift_ptr, scale_ptr, tokens, dim, param_stride, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(x_ptr + row * dim + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(centered * centered, axis=0) / dim + eps))
    params = (row // tokens) * param_stride + offs
    scale = tl.load(scale_ptr + params, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + params, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * dim + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated(out_ptr, residual_ptr, y_ptr, gate_ptr, tokens, dim, param_stride, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gate_row = gate_ptr + (row // tokens) * param_stride
    for start in range(0, dim, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = offs < dim
        residual = tl.load(residual_ptr + row * dim + offs, mask=mask).to(tl.float32)
        y = tl.load(y_ptr + row * dim + offs, mask=mask).to(tl.float32)
        gate = tl.load(gate_row + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * dim + offs, (residual + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def adaln_modulate(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> None:
    """out[b, n] = LayerNorm(x[b, n]) * (1 + scale[b]) + shift[b]; x and out contiguous [B, N, D], shift / scale
    [B, D] with unit stride along D."""
    batch, tokens, dim = x.shape
    block = triton.next_power_of_2(dim)
    _modulate[(batch * tokens,)](out, x, shift, scale, tokens, dim, shift.stride(0), eps, BLOCK_D=block,
                                 num_warps=_warps(block))


def adaln_gated_residual(out: torch.Tensor, residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    """out[b, n] = residual[b, n] + gate[b] * y[b, n]; residual, y and out contiguous [B, N, D], gate [B, D] with
    unit stride along D."""
    batch, tokens, dim = residual.shape
    block = min(triton.next_power_of_2(dim), MAX_TILE)
    _gated[(batch * tokens,)](out, residual, y, gate, tokens, dim, gate.stride(0), BLOCK_D=block,
                              num_warps=_warps(block))
