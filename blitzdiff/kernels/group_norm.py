"""GroupNorm with the glue a diffusion UNet puts around it: AdaGN scale / shift, SiLU, a residual add.

`group_norm_ref` is the specification (pure PyTorch; runs anywhere; what export traces). Fused Triton / CUDA / C++
kernels join it as backends of the same function (issue 4); until then "ref" is the only backend.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import check_backend

BACKENDS = ("ref",)


def group_norm_ref(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """y = GroupNorm(x) * weight + bias; then y * (1 + scale) + shift (AdaGN); then SiLU; then + residual.

    x: [B, C, *spatial] (any memory format); weight, bias: [C] or None; scale, shift: [B, C] or None (broadcast
    over spatial); residual: x's shape or None. Statistics are computed in (at least) float32 whatever x's dtype (fp16 /
    bf16 sums lose too much); the result has x's dtype. The order is diffusers' ResnetBlock2D with
    resnet_time_scale_shift="scale_shift": norm, affine, modulation, activation.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    y = F.group_norm(x.to(acc), num_groups, None, None, eps)
    view = (1, -1) + (1,) * (x.dim() - 2)  # [1, C, 1, ...]
    if weight is not None:
        y = y * weight.to(acc).reshape(view)
    if bias is not None:
        y = y + bias.to(acc).reshape(view)
    per_sample = (x.shape[0], -1) + (1,) * (x.dim() - 2)  # [B, C, 1, ...]
    if scale is not None:
        y = y * (1.0 + scale.to(acc).reshape(per_sample))
    if shift is not None:
        y = y + shift.to(acc).reshape(per_sample)
    if silu:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = False,
    residual: Tensor | None = None,
    backend: str = "ref",
) -> Tensor:
    """group_norm_ref's result computed by `backend` (see BACKENDS)."""
    check_backend("group_norm", backend, BACKENDS)
    return group_norm_ref(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu, residual=residual)
