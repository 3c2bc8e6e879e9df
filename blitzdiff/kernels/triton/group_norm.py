"""Fused GroupNorm (+ AdaGN scale / shift, SiLU, residual) in Triton: two kernels, moments then apply.

A group of sample b is a [Cg, S] plane (Cg = C / groups channels, S spatial positions) read through strides, so
channels-first ([B, C, S]: stride_s == 1) and channels-last ([B, S, C]: stride_c == 1) memory are both read in
place; Triton specializes the unit stride, so each layout gets coalesced loads along its contiguous axis. The plane
is cut into [BLOCK_C, BLOCK_S] tiles.

1. `_moments`: grid (B * groups, parts). Program p takes tiles p, p + parts, ...; per tile the exact two-pass
   mean and M2 of the values in registers, merged across its tiles with Chan's formula (float32). One read of x.
2. `_apply`: grid (B * groups, tiles). Each program merges its group's `parts` partial moments (a handful of
   loads), folds weight, bias, scale and shift into y = (x - mean) * a[c] + k[c] (these few values in float64,
   rounded once), applies SiLU and the residual and stores in x's dtype: one read of x (and the residual), one
   write.

Float16 / bfloat16 / float32 inputs; statistics and the element math in float32, rounded once at the store.
Imported only when the "triton" backend is asked for; blitzdiff.kernels.group_norm checks the inputs first.
"""

import torch
import triton
import triton.language as tl

TILE = 2048  # elements per tile: 8 KiB of float32 in registers per program
MAX_PARTS = 32  # partial moments per group: enough programs for a GPU, few enough to merge in one load


@triton.jit
def _moments(
    x_ptr, part_ptr, groups, group_channels, spatial, stride_b, stride_c, stride_s, tiles_s, tiles, parts,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg, p = tl.program_id(0), tl.program_id(1)  # (sample * groups + group, part)
    b, g = bg // groups, bg % groups
    base = x_ptr + b.to(tl.int64) * stride_b + (g * group_channels).to(tl.int64) * stride_c
    n = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for t in range(p, tiles, parts):
        offs_c = (t // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (t % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
        c_ok, s_ok = offs_c < group_channels, offs_s < spatial
        mask = c_ok[:, None] & s_ok[None, :]
        v = tl.load(base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s, mask=mask, other=0.0)
        v = v.to(tl.float32)
        count = tl.sum(c_ok.to(tl.float32)) * tl.sum(s_ok.to(tl.float32))
        tile_mean = tl.sum(v) / count
        d = tl.where(mask, v - tile_mean, 0.0)
        tile_m2 = tl.sum(d * d)
        total = n + count  # Chan et al.: merge (count, tile_mean, tile_m2) into (n, mean, m2)
        delta = tile_mean - mean
        mean += delta * (count / total)
        m2 += tile_m2 + delta * delta * (n * count / total)
        n = total
    out = part_ptr + (bg * parts + p) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _apply(
    x_ptr, out_ptr, res_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, part_ptr, eps,
    groups, group_channels, spatial, stride_b, stride_c, stride_s, scale_stride, shift_stride, tiles_s, parts,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bg, t = tl.program_id(0), tl.program_id(1)  # (sample * groups + group, tile)
    b, g = bg // groups, bg % groups

    # The group's moments: merge its partials (Chan's formula, all at once), then the per-channel coefficients
    # y = (x - mean) * a + k. Float64 for these few scalars and [BLOCK_C] vectors: a and k round once to float32.
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < parts
    part = part_ptr + (bg * parts + offs_p) * 3
    pn = tl.load(part, mask=p_ok, other=0.0).to(tl.float64)
    pmean = tl.load(part + 1, mask=p_ok, other=0.0).to(tl.float64)
    pm2 = tl.load(part + 2, mask=p_ok, other=0.0).to(tl.float64)
    n = tl.sum(pn, axis=0)
    mean = tl.sum(pn * pmean, axis=0) / n
    m2 = tl.sum(pm2 + pn * (pmean - mean) * (pmean - mean), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)

    offs_c = (t // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = (t % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = offs_c < group_channels
    channel = g * group_channels + offs_c
    a = tl.zeros([BLOCK_C], tl.float64) + rstd
    k = tl.zeros([BLOCK_C], tl.float64)
    if HAS_W:
        a = a * tl.load(w_ptr + channel, mask=c_ok, other=0.0).to(tl.float64)
    if HAS_BIAS:
        k = tl.load(bias_ptr + channel, mask=c_ok, other=0.0).to(tl.float64)
    if HAS_SCALE:
        factor = 1.0 + tl.load(scale_ptr + b * scale_stride + channel, mask=c_ok, other=0.0).to(tl.float64)
        a = a * factor
        k = k * factor
    if HAS_SHIFT:
        k = k + tl.load(shift_ptr + b * shift_stride + channel, mask=c_ok, other=0.0).to(tl.float64)
    a32, k32, mean32 = a.to(tl.float32), k.to(tl.float32), mean.to(tl.float32)

    sample = b.to(tl.int64) * stride_b + (g * group_channels).to(tl.int64) * stride_c
    offs = sample + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    mask = c_ok[:, None] & (offs_s < spatial)[None, :]
    y = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean32) * a32[:, None] + k32[:, None]
    if SILU:  # a correctly rounded division: float32 `/` is a 2-ulp approximation on NVIDIA GPUs
        y = tl.math.div_rn(y, 1.0 + tl.exp(-y))
    if HAS_RES:
        y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def tiling(group_channels: int, spatial: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): powers of two covering at most TILE elements, no wider than the plane needs."""
    block_c = min(triton.next_power_of_2(group_channels), 64)
    block_s = min(triton.next_power_of_2(spatial), max(1, TILE // block_c))
    return block_c, block_s


def group_norm_triton(
    out: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    residual: torch.Tensor | None,
    channels_last: bool,
) -> None:
    """Write the fused GroupNorm of x into out (x's shape, dtype and layout; residual too).

    x: [B, C, *spatial], contiguous (channels_last False) or channels-last (True); weight, bias: contiguous [C];
    scale, shift: [B, C] with unit channel stride. Non-empty.
    """
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    group_channels = channels // num_groups
    if channels_last:
        stride_b, stride_c, stride_s = spatial * channels, 1, channels
    else:
        stride_b, stride_c, stride_s = channels * spatial, spatial, 1
    block_c, block_s = tiling(group_channels, spatial)
    tiles_s = triton.cdiv(spatial, block_s)
    tiles = triton.cdiv(group_channels, block_c) * tiles_s
    parts = min(tiles, MAX_PARTS)
    assert tiles < 2**16, "grid axis 1 is limited to 65535 programs"
    part = torch.empty((batch * num_groups, parts, 3), dtype=torch.float32, device=x.device)
    _moments[(batch * num_groups, parts)](
        x, part, num_groups, group_channels, spatial, stride_b, stride_c, stride_s, tiles_s, tiles, parts,
        BLOCK_C=block_c, BLOCK_S=block_s,
    )
    _apply[(batch * num_groups, tiles)](
        x, out, residual if residual is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        scale if scale is not None else x, shift if shift is not None else x,
        part, eps, num_groups, group_channels, spatial, stride_b, stride_c, stride_s,
        scale.stride(0) if scale is not None else 0, shift.stride(0) if shift is not None else 0, tiles_s, parts,
        HAS_W=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, SILU=silu, HAS_RES=residual is not None,
        BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_P=triton.next_power_of_2(parts),
    )
