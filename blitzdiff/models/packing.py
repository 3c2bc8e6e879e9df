"""An attention block's q / k / v projections as one GEMM in eager inference.

A self-attention block reads one input with three nn.Linear layers (diffusers' to_q / to_k / to_v). At batch 1 on
the CPU each is a few microseconds of call cost around a small GEMM; packed, one F.linear computes all three.
`PackedLinears` moves the layers' weights (and biases) into one buffer, [sum of out_features, in_features] (and
[sum of out_features]); each layer's parameters become views of it, so their values, names, state-dict keys,
load_state_dict (which copies in place), Pipeline.load_weights and in-place updates are unchanged. `tensors()` gives
the buffers only while every parameter still is its view: a parameter replaced (a new nn.Parameter,
load_state_dict(assign=True)) turns the packing off, and the layers run separately, never from a stale copy.
`QKVPacking._apply` drops the packing when `.to()`, `.half()` and the like move the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode


class PackedLinears:
    """nn.Linear layers of one input width, their parameters moved into one weight (and bias) buffer."""

    def __init__(self, layers: Sequence[nn.Linear]):
        first = layers[0]
        with_bias = first.bias is not None
        for layer in layers:
            if (layer.in_features != first.in_features or (layer.bias is not None) != with_bias
                    or layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device):
                raise ValueError("PackedLinears: the layers need one input width, dtype and device, and biases on "
                                 "all or none of them")
        names = ("weight", "bias") if with_bias else ("weight",)
        with torch.no_grad():
            buffers = [torch.cat([layer._parameters[name] for layer in layers]) for name in names]
        start = 0
        for layer in layers:
            size = layer.out_features
            for name, buffer in zip(names, buffers, strict=True):
                old = layer._parameters[name]
                setattr(layer, name, nn.Parameter(buffer[start:start + size], requires_grad=old.requires_grad))
            start += size
        self.weight, self.bias = buffers[0], buffers[1] if with_bias else None
        # (a layer's parameter dict, name, the view's address): nn.Module's own dicts, read directly because a
        # lookup there costs 0.05 us where `layer.weight` costs 0.5 us, and tensors() checks all six per call
        self._slots = [(layer._parameters, name, layer._parameters[name].data_ptr())
                       for layer in layers for name in names]

    def tensors(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight, bias) while every layer's parameter still is its view of them, else None."""
        for params, name, address in self._slots:
            param = params.get(name)
            if param is None or param.data_ptr() != address:
                return None
        return self.weight, self.bias


class QKVPacking:
    """For attention modules (nn.Module subclasses) with `to_q`, `to_k`, `to_v` nn.Linear layers: `pack_qkv()`
    packs them, and `project_qkv(x, heads)` gives q, k, v [B, heads, N, D] from x [B, N, C], by one GEMM when
    packed and running eagerly without gradients (sampling), else by the three layers (training, torch.compile and
    export tracing, dispatch modes see the module's own parameters)."""

    _packed: PackedLinears | None = None

    def packable(self) -> bool:
        """Whether to_q, to_k and to_v read the same input (self-attention); cross-attention modules override it."""
        return True

    def pack_qkv(self) -> None:
        self._packed = PackedLinears([self.to_q, self.to_k, self.to_v])

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to() / .half() / .cuda() give the parameters new memory: the buffers would be stale
        return super()._apply(fn, recurse)

    def project_qkv(self, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        packed = self._packed
        if (packed is not None and not torch.is_grad_enabled() and type(x) is Tensor
                and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None):
            tensors = packed.tensors()
            if tensors is not None:
                qkv = F.linear(x, *tensors).view(x.shape[0], x.shape[1], 3, heads, -1)  # [B, N, 3, heads, D]
                return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, D]
            self._packed = None  # a parameter was replaced: free the buffers
        return split_heads(self.to_q(x), heads), split_heads(self.to_k(x), heads), split_heads(self.to_v(x), heads)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """A projection [B, N, heads * D] as [B, heads, N, D] (a view)."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def pack_attention(model: nn.Module) -> nn.Module:
    """Pack the q / k / v projections of every self-attention module of `model` (QKVPacking.pack_qkv); returns
    `model`. The eager inference speed-up of blitzdiff.load; anything else is unchanged."""
    for module in model.modules():
        if isinstance(module, QKVPacking) and module.packable():
            module.pack_qkv()
    return model
