"""Scaled dot-product attention for self- and cross-attention in UNets and DiTs.

`attention_ref` is the specification: softmax(q k^T * scale) v by PyTorch's scaled_dot_product_attention (a
standard op: it runs anywhere and exports to ONNX). Flash-style Triton / CUDA kernels join it as backends (issue
4); until then "ref" is the only backend.
"""

from torch import Tensor
from torch.nn import functional as F

from ._backends import check_backend

BACKENDS = ("ref",)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """q: [B, H, Lq, D], k and v: [B, H, Lk, D] -> [B, H, Lq, D]. scale defaults to 1 / sqrt(D). No mask."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, backend: str = "ref") -> Tensor:
    """attention_ref's result computed by `backend` (see BACKENDS)."""
    check_backend("attention", backend, BACKENDS)
    return attention_ref(q, k, v, scale)
