"""Flash-attention forward in Triton: softmax(q k^T * scale) v without materializing the [Lq, Lk] scores.

FlashAttention-2's forward (Dao 2023, Algorithm 1): a program owns BLOCK_M query rows of one (batch, head), keeps
them in registers and streams K/V in BLOCK_N-key tiles, keeping a running row maximum `m_i`, a running row sum
`l_i` and an unnormalized output `acc`, all float32; the output is divided by `l_i` once at the end. Scores are
scaled then maximized (so a negative scale is fine) and exponentiated as exp2 with log2(e) folded into the scale.
float16 / bfloat16: tensor-core dots; the probabilities are rounded to the input dtype for the second dot, as every
flash kernel does, and `l_i` sums those rounded values, so the weights applied to v are normalized exactly.
float32: "ieee" dots (never TF32: the error budget is float32's), the score dot split into 16-wide slices of the
head dim summed afterwards (a single FMA chain over D = 128 loses ~3x the accuracy of a blocked BLAS; measured).

Strides are arguments, so transposed views such as q from a [B, L, H, D] projection are read in place. Key tails
(Lk not a multiple of BLOCK_N) are masked to -inf before the maximum; padded head-dimension columns load as zero.
Under TRITON_INTERPRET=1 bfloat16 operands are widened to float32 before the dots (exact: bfloat16 products fit
float32), since the interpreter multiplies bfloat16 bit patterns (triton-lang/triton#11584).
Imported only when the "triton" backend is asked for; blitzdiff.kernels.attention checks the inputs first.
"""

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreted as _interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, scale_log2e,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om,
    len_q, len_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (query tiles, heads, batch); 64-bit (batch, head) and row offsets, so large strided views cannot overflow
    head, batch = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < len_q
    rows = offs_m.to(tl.int64)

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    if CHUNKS == 1:  # q [BLOCK_M, BLOCK_D], kt_ptrs [BLOCK_D, BLOCK_N]: the score tile is one dot
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        kt_mask = d_ok[:, None]
    else:  # q [CHUNKS, BLOCK_M, 16], kt_ptrs [CHUNKS, 16, BLOCK_N]: one dot per 16-wide slice of the head dim
        offs_c = tl.arange(0, CHUNKS)
        offs_j = tl.arange(0, 16)
        d_q = offs_c[:, None, None] * 16 + offs_j[None, None, :]
        q = tl.load(q_base + rows[None, :, None] * stride_qm + d_q * stride_qd,
                    mask=m_ok[None, :, None] & (d_q < HEAD_DIM), other=0.0)
        d_k = offs_c[:, None, None] * 16 + offs_j[None, :, None]
        kt_ptrs = k_base + offs_n[None, None, :] * stride_kn + d_k * stride_kd
        kt_mask = d_k < HEAD_DIM
    if UPCAST:
        q = q.to(tl.float32)
    v_ptrs = v_ptr + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for start_n in range(0, len_k, BLOCK_N):
        n_ok = start_n + offs_n < len_k
        kt = tl.load(kt_ptrs, mask=kt_mask & n_ok, other=0.0)  # K^T tile, [BLOCK_D, BLOCK_N] or chunked
        if UPCAST:
            kt = kt.to(tl.float32)
        if CHUNKS == 1:
            s = tl.dot(q, kt, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        else:  # 16-term FMA chains, then their sum: a blocked BLAS's accuracy, not one chain of length D
            s = tl.sum(tl.dot(q, kt, input_precision=PRECISION), 0)
        s = s * scale_log2e
        s = tl.where(n_ok[None, :], s, float("-inf"))  # keys past Lk take no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one real key
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum (0 on the first tile)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        p = p.to(v_ptr.dtype.element_ty)  # the second dot's operand dtype (a no-op for float32)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        if UPCAST:
            v, p = v.to(tl.float32), p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    out = tl.div_rn(acc, l_i[:, None])  # IEEE division: `/` may lower to an approximate one
    o_ptrs = o_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options: FlashAttention-2's forward shapes for a GPU; small tiles for the interpreter."""
    if _interpreting():  # numpy simulation: fewer, smaller programs run faster
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    if dtype == torch.float32:  # CUDA-core FMA dots; 8 warps share the per-chunk partial score tiles
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64 if head_dim <= 64 else 32, "num_warps": 8 if head_dim > 64 else 4,
            "num_stages": 3}


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Write softmax(q k^T * scale) v into `out` ([B, H, Lq, D], last dim contiguous); q/k/v of any strides.

    Inputs are checked by the caller (same dtype and device, D <= 128, Lk >= 1, no element count of 0).
    """
    batch, heads, len_q, head_dim = q.shape
    cfg = _config(head_dim, q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = q.dtype == torch.float32
    grid = (triton.cdiv(len_q, cfg["BLOCK_M"]), heads, batch)
    _attention_fwd[grid](
        q, k, v, out, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        len_q, k.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=block_d, **cfg,
        CHUNKS=block_d // 16 if fp32 else 1, PRECISION="ieee" if fp32 else "tf32",  # tf32: the default, unused
        UPCAST=q.dtype == torch.bfloat16 and _interpreting(),
    )
