"""The sinusoidal timestep embedding in Triton, alone and fused with the time MLP's first linear layer and SiLU.

Both kernels read the float32 frequency table the caller cached (the spec's own torch ops computed it, so the
arguments scale * (t * freq) are the spec's bits) and compute sin / cos in float32. The fused kernel computes the
embedding tile by tile along the reduction dimension, straight into a dot with linear_1's weight, so the [B, dim]
embedding never reaches memory: h = SiLU(round(emb) @ W1^T + b1), with emb rounded to the weight dtype (what the
spec's `.to(weight.dtype)` does) and the dot in float32 (`input_precision="ieee"`: never TF32). h is rounded once
to the weight dtype; linear_2 stays a cuBLAS matmul in the caller. Imported only when the "triton" backend is asked
for; blitzdiff.kernels.timestep_embedding checks the inputs first.
"""

import torch
import triton
import triton.language as tl

BLOCK_B, BLOCK_N, BLOCK_K = 16, 32, 64  # tl.dot needs >= 16 rows; the batch is small, the hidden size is not


@triton.jit
def _embedding(t, cols, freq_ptr, half, scale, FLIP: tl.constexpr):
    """[sin, cos] ([cos, sin] with FLIP) of scale * (t * freq) at columns `cols`; 0 past 2 * half (odd dim)."""
    second = cols >= half
    in_table = cols < 2 * half
    freq = tl.load(freq_ptr + tl.where(second, cols - half, cols), mask=in_table, other=0.0)
    arg = scale * (t * freq)
    if FLIP:
        emb = tl.where(second, tl.sin(arg), tl.cos(arg))
    else:
        emb = tl.where(second, tl.cos(arg), tl.sin(arg))
    return tl.where(in_table, emb, 0.0)


@triton.jit
def _embed(out_ptr, t_ptr, t_stride, freq_ptr, dim, half, scale, FLIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row * t_stride).to(tl.float32)  # torch's .float(): round to nearest
    for start in range(0, dim, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        emb = _embedding(t, cols, freq_ptr, half, scale, FLIP)
        tl.store(out_ptr + row * dim + cols, emb, mask=cols < dim)


@triton.jit
def _embed_linear_silu(
    h_ptr, t_ptr, t_stride, freq_ptr, w_ptr, b_ptr, batch, dim, half, hidden, stride_wn, stride_wk, scale,
    FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < batch, cols < hidden
    t = tl.load(t_ptr + rows.to(tl.int64) * t_stride, mask=row_ok, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for start in range(0, dim, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        emb = _embedding(t[:, None], ks[None, :], freq_ptr, half, scale, FLIP)  # [BLOCK_B, BLOCK_K]
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & (ks[:, None] < dim), other=0.0)  # [BLOCK_K, BLOCK_N] tile of W1^T
        emb = emb.to(w.dtype).to(tl.float32)  # the spec's emb.to(weight.dtype)
        acc = tl.dot(emb, w.to(tl.float32), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = acc * tl.sigmoid(acc)  # SiLU
    tl.store(h_ptr + rows[:, None] * hidden + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def timestep_embedding(out: torch.Tensor, timesteps: torch.Tensor, freqs: torch.Tensor, flip: bool,
                       scale: float) -> None:
    """out [B, dim] float32 (contiguous) = the embedding of timesteps [B] (any stride) with the [half] table."""
    batch, dim = out.shape
    block = min(triton.next_power_of_2(dim), 1024)
    _embed[(batch,)](out, timesteps, timesteps.stride(0), freqs, dim, dim // 2, scale, FLIP=flip, BLOCK=block)


def embedding_linear_silu(h: torch.Tensor, timesteps: torch.Tensor, freqs: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, flip: bool, scale: float) -> None:
    """h [B, H] (contiguous, weight's dtype) = SiLU(embedding(timesteps) @ weight^T + bias); weight [H, dim]."""
    batch, hidden = h.shape
    dim = weight.shape[1]
    grid = (triton.cdiv(batch, BLOCK_B), triton.cdiv(hidden, BLOCK_N))
    _embed_linear_silu[grid](
        h, timesteps, timesteps.stride(0), freqs, weight, weight if bias is None else bias, batch, dim, dim // 2,
        hidden, weight.stride(0), weight.stride(1), scale,
        FLIP=flip, HAS_BIAS=bias is not None, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
