"""adaLN modulation for DiT blocks (Peebles & Xie 2023): LayerNorm without affine, then per-sample scale / shift.

`adaln_modulate_ref` is the specification (pure PyTorch). Fused kernels (with the gated residual) join it as
backends in issue 4; until then "ref" is the only backend.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import check_backend

BACKENDS = ("ref",)


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x: [B, N, D]; shift, scale: [B, D] -> LayerNorm(x) * (1 + scale) + shift, [B, N, D].

    Statistics in (at least) float32 whatever x's dtype; the result has x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    y = F.layer_norm(x.to(acc), x.shape[-1:], None, None, eps)
    return (y * (1.0 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]).to(x.dtype)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *, backend: str = "ref") -> Tensor:
    """adaln_modulate_ref's result computed by `backend` (see BACKENDS)."""
    check_backend("adaln_modulate", backend, BACKENDS)
    return adaln_modulate_ref(x, shift, scale, eps)
