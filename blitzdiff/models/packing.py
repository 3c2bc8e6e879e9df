"""Parameters of several layers packed into one buffer, so that eager inference runs one GEMM where a network makes
several small ones: an attention block's q / k / v projections (QKVPacking), DiT's per-block conditioning layers
(models.dit.DiT.pack_conditioning), a UNet's per-resnet time projections (models.unet_2d.UNetBody.pack_conditioning).

At batch 1 on the CPU each small layer call is a few microseconds of call cost around a small GEMM.
`PackedParameters` moves the layers' weights (and biases) into one buffer per name (concatenated along dim 0: for
nn.Linear layers [sum of out_features, in_features] and [sum of out_features]); each layer's parameters become
views of it, so their values, names, state-dict keys, load_state_dict (which copies in place), Pipeline.load_weights
and in-place updates are unchanged. `tensors()` gives the buffers only while every parameter still is its view: a
parameter replaced (a new nn.Parameter, load_state_dict(assign=True)) turns the packing off, and the layers run
separately, never from a stale copy. The owning modules' `_apply` drops the packing when `.to()`, `.half()` and the
like move the parameters, and keeps it through a memory-format change (which leaves 2-D weights alone).
blitzdiff.load packs (pack_projections); models built directly run unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..kernels._backends import eager_tensor
from ..malloc import release_free_heap
from .linear import DirectLinear, linear


class PackedParameters:
    """The parameters named `names` of several modules, each name's moved into one buffer (concatenated along dim 0;
    the modules' parameters of a name must agree past dim 0, in dtype and device)."""

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str]):
        # (rows, shape past dim 0, dtype, device) per name; no tensor is held here, so each old parameter is freed
        # as soon as its view replaces it
        layouts = [_layout(modules, name) for name in names]
        buffers = []
        for name, (rows, trailing, dtype, device) in zip(names, layouts, strict=True):
            buffer = torch.empty((rows, *trailing), dtype=dtype, device=device)
            start = 0
            # one layer at a time: each old parameter is freed as its view replaces it, and on the CPU handed back
            # to the kernel at once (blitzdiff.tune_malloc's trim threshold would keep it in the heap: a
            # DiT-XL/2-256 float32 load peaked 1.1 GiB higher and stayed there), while the buffer's pages become
            # resident only as they are written: the extra memory is about one layer, not one kind
            for module in modules:
                old = module._parameters[name]
                view = buffer[start:start + old.shape[0]]
                with torch.no_grad():
                    view.copy_(old)
                setattr(module, name, nn.Parameter(view, requires_grad=old.requires_grad))
                start += old.shape[0]
                if buffer.is_cpu:
                    del old
                    release_free_heap()
            buffers.append(buffer)
        self.buffers = tuple(buffers)
        # (a module's parameter dict, name, the view's address): nn.Module's own dicts, read directly because a
        # lookup there costs 0.05 us where `module.weight` costs 0.5 us, and tensors() checks them all per call
        self._slots = [(module._parameters, name, module._parameters[name].data_ptr())
                       for module in modules for name in names]

    def tensors(self) -> tuple[Tensor, ...] | None:
        """The buffers, one per name, while every module's parameter still is its view of them, else None."""
        for params, name, address in self._slots:
            param = params.get(name)
            if param is None or param.data_ptr() != address:
                return None
        return self.buffers


def _layout(modules: Sequence[nn.Module], name: str) -> tuple[int, torch.Size, torch.dtype, torch.device]:
    """The packed buffer's rows, shape past dim 0, dtype and device for the modules' parameters `name`; ValueError
    unless every module has one and they agree past dim 0, in dtype and device."""
    params = [module._parameters.get(name) for module in modules]
    first = params[0]
    if first is None or any(p is None or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype
                            or p.device != first.device for p in params):
        raise ValueError(f"PackedParameters: every module needs a {name!r} parameter, of one shape past dim 0, "
                         f"dtype and device")
    return sum(p.shape[0] for p in params), first.shape[1:], first.dtype, first.device


def eager_inference(x: Tensor) -> bool:
    """Whether a module may run packed parameters on x: no gradients to record, and kernels._backends.eager_tensor
    (torch.compile / export tracing, dispatch modes and tensor subclasses see the modules' own parameters)."""
    return not torch.is_grad_enabled() and eager_tensor(x)


class PackingOwner:
    """For nn.Module subclasses that keep packings in the attributes named by PACKED, each a PackedParameters, a
    tuple of them, or None (not packed): `packed_buffers(name)` gives the buffers to run while every view is live
    and drops a stale packing (a replaced parameter); `_apply` drops the packings that .to() / .half() moved at once,
    freeing their buffers, and keeps them through a memory-format change (which leaves 2-D weights where they are)."""

    PACKED: ClassVar[tuple[str, ...]] = ()

    def packed_buffers(self, name: str) -> tuple[Tensor, ...] | list[tuple[Tensor, ...]] | None:
        """Attribute `name`'s buffers (PackedParameters.tensors(); for a tuple, one such per member) while all its
        views are live, else None, the attribute then set to None."""
        packing = getattr(self, name)
        if packing is None:
            return None
        if isinstance(packing, PackedParameters):
            tensors = packing.tensors()
        else:
            tensors = [p.tensors() for p in packing]
            if any(t is None for t in tensors):
                tensors = None
        if tensors is None:
            setattr(self, name, None)  # free the buffers
        return tensors

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        for name in self.PACKED:
            self.packed_buffers(name)
        return module


class QKVPacking(PackingOwner):
    """For attention modules (nn.Module subclasses with a kernel `backend`) with `to_q`, `to_k`, `to_v` nn.Linear
    layers: `pack_qkv()` packs them, and `project_qkv(x, heads)` gives q, k, v [B, heads, N, D] from x [B, N, C], by
    one linear when packed and running eagerly without gradients (sampling; on the "auto" backend by
    models.linear's kernel where it applies), else by the three layers (training, torch.compile and export tracing,
    dispatch modes see the module's own parameters)."""

    PACKED = ("_packed",)
    _packed: PackedParameters | None = None
    _packed_direct: DirectLinear | None = None  # the packed weight's blocked copy for models.linear's kernel

    def packable(self) -> bool:
        """Whether to_q, to_k and to_v read the same input (self-attention); cross-attention modules override it."""
        return True

    def pack_qkv(self) -> None:
        layers = [self.to_q, self.to_k, self.to_v]
        self._packed = PackedParameters(layers, ("weight",) if self.to_q.bias is None else ("weight", "bias"))
        self._packed_direct = DirectLinear()

    def project_qkv(self, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
        if self._packed is not None and eager_inference(x) and (tensors := self.packed_buffers("_packed")):
            qkv = packed_linear(x, tensors, self._packed_direct, self.backend)
            qkv = qkv.view(x.shape[0], x.shape[1], 3, heads, -1)  # [B, N, 3, heads, D]
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, D]
        return split_heads(self.to_q(x), heads), split_heads(self.to_k(x), heads), split_heads(self.to_v(x), heads)


def packed_linear(x: Tensor, tensors: tuple[Tensor, ...], direct: DirectLinear | None, backend: str) -> Tensor:
    """F.linear(x, *tensors) on packed buffers (a weight, and a bias or not), by models.linear's kernel on the "auto"
    backend where it applies (with `direct`, the packing's blocked copy)."""
    return linear(x, tensors[0], tensors[1] if len(tensors) > 1 else None, direct if backend == "auto" else None)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """A projection [B, N, heads * D] as [B, heads, N, D] (a view)."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def pack_projections(model: nn.Module) -> nn.Module:
    """Pack the q / k / v projections of every self-attention module of `model` (QKVPacking.pack_qkv) and, in a
    DiT, the blocks' conditioning layers, in a UNet the resnets' time projections (pack_conditioning); returns
    `model`. The eager inference speed-up of blitzdiff.load; anything else is unchanged."""
    for module in model.modules():
        if isinstance(module, QKVPacking) and module.packable():
            module.pack_qkv()
        elif hasattr(module, "pack_conditioning"):
            module.pack_conditioning()
    return model
