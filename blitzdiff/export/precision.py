"""The precision of an export: the dtype its network runs in, the copy of the network in that dtype, and the
policy of what a half-precision graph still computes in float32.

float16 overflows (max 65504) and rounds (11-bit significand) where statistics are taken over many values, so a
float16 export keeps these computations in float32 (FLOAT32_OPS, recorded in the manifest): GroupNorm (statistics,
affine, SiLU, residual: kernels.group_norm_ref upcasts itself), LayerNorm (every aten.layer_norm: the translation
below; the SD UNet's nn.LayerNorm would otherwise export in float16, DiT's adaLN, kernels.adaln_modulate_ref, upcasts
itself too), the attention softmax (the translation below: PyTorch's fused SDPA kernels take their softmax in
float32, torchlib's ONNX decomposition of SDPA does not) and the timestep embedding's sin / cos
(kernels.timestep_embedding_ref returns float32 whatever the network's dtype).
Matmuls and convolutions run in float16, as diffusers / Optimum float16 exports do; tests/export/test_precision.py
checks the graph (every input of those ONNX ops is float32) and the error against float32.

bfloat16 is refused (measured with onnx 1.23 / onnxruntime 1.32): at opset 18 ONNX's Conv does not take bfloat16
(Conv-22 does) and Einsum (DiT's unpatchify) takes it at no opset, so the graph is invalid ONNX; at opset 23 a UNet
graph is valid but ONNX Runtime's CPU provider has no bfloat16 Gemm kernel, so it cannot run.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16}
BFLOAT16_REFUSED = ("bfloat16 exports are not supported: ONNX's Conv takes bfloat16 only from opset 22, Einsum at no "
                    "opset, and ONNX Runtime's CPU provider has no bfloat16 kernels (Gemm); export float16 or float32 "
                    "(dtype='float16', --dtype float16)")
# The computations a float16 export keeps in float32 -> the ONNX ops they become, whose inputs are float32 in the graph.
FLOAT32_OPS = {
    "group_norm": ("InstanceNormalization", "GroupNormalization"),  # kernels.group_norm_ref's upcast
    "layer_norm": ("LayerNormalization",),  # _layer_norm_float32 (adaln_modulate_ref upcasts itself too)
    "attention_softmax": ("Softmax",),  # _attention_float32_softmax
    "timestep_embedding": ("Sin", "Cos"),  # kernels.timestep_embedding_ref: float32 [B, dim]
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_dtype(dtype: torch.dtype | str | None, network: nn.Module) -> torch.dtype:
    """The dtype to export `network` in: `dtype` (a name or a torch dtype), None meaning the network's own."""
    resolved = next(network.parameters()).dtype if dtype is None else dtype
    if isinstance(resolved, str):
        resolved = getattr(torch, resolved, resolved)
    if resolved == torch.bfloat16:
        raise ValueError(BFLOAT16_REFUSED)
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported for export; allowed: {', '.join(DTYPES)} (or None: "
                         "the pipeline's)")
    return resolved


def in_dtype(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`network` itself when it is in `dtype`, else a copy in `dtype` (the user's module is never changed). Each
    floating tensor is converted straight into the copy: peak memory is the network plus the copy, never two copies
    of the original."""
    if next(network.parameters()).dtype == dtype:
        return network
    memo: dict[int, Any] = {}
    for param in network.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    for buffer in network.buffers():
        if buffer.is_floating_point():
            memo[id(buffer)] = buffer.to(dtype)
    return copy.deepcopy(network, memo)


def float32_translations(dtype: torch.dtype) -> dict[Any, Any] | None:
    """torch.onnx.export's custom_translation_table for a `dtype` export: None for float32 (torchlib's own)."""
    if dtype == torch.float32:
        return None
    return {torch.ops.aten.layer_norm.default: _layer_norm_float32,
            torch.ops.aten.scaled_dot_product_attention.default: _attention_float32_softmax}


def _float32(value: Any) -> Any:
    from onnxscript import ir
    from onnxscript import opset18 as op

    return value if value.dtype == ir.DataType.FLOAT else op.Cast(value, to=ir.DataType.FLOAT)


def _layer_norm_float32(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5,
                        cudnn_enable: bool = True) -> Any:
    """aten::layer_norm as ONNX: LayerNormalization of the input, weight and bias cast to float32 (as
    kernels.group_norm_ref computes GroupNorm), the result rounded once to the input's dtype."""
    from onnxscript import opset18 as op

    axis = -len(normalized_shape)
    x = _float32(input)
    scale = op.Expand(op.Constant(value_float=1.0), op.Shape(x, start=axis)) if weight is None else _float32(weight)
    y, _, _ = op.LayerNormalization(x, scale, None if bias is None else _float32(bias), axis=axis, epsilon=eps)
    return y if y.dtype == input.dtype else op.Cast(y, to=input.dtype)


def _attention_float32_softmax(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
    """aten::scaled_dot_product_attention as kernels.attention_ref calls it (4-D, no mask, no dropout): scores
    (q * sqrt(scale)) (k * sqrt(scale))^T in the network's dtype (the scale split as torchlib and PyTorch's math
    kernel split it, which keeps the product small), softmax in float32, probabilities @ v in the network's dtype."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    assert attn_mask is None and not is_causal and dropout_p == 0.0 and not enable_gqa, "attention_ref's call"
    assert len(query.shape) == 4 and isinstance(query.shape[-1], int), "q [B, H, L, D] with a fixed head dim"
    root = math.sqrt(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
    factor = op.Constant(value=ir.tensor(root, dtype=query.dtype))
    scores = op.MatMul(op.Mul(query, factor), op.Transpose(op.Mul(key, factor), perm=[0, 1, 3, 2]))  # [B, H, Lq, Lk]
    probabilities = op.Softmax(_float32(scores), axis=-1)
    if value.dtype != ir.DataType.FLOAT:
        probabilities = op.Cast(probabilities, to=value.dtype)
    return op.MatMul(probabilities, value)  # [B, H, Lq, D]
