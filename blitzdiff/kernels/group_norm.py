"""GroupNorm with the glue a diffusion UNet puts around it: AdaGN scale / shift, SiLU, a residual add.

`group_norm_ref` is the specification (pure PyTorch; runs anywhere; what export traces: `group_norm(...,
backend="ref")` calls it directly). The op `blitzdiff::group_norm` computes it with a backend chosen per call
(ARCHITECTURE.md contract 5): "ref" (the spec), "cpu" and "cuda" (csrc/group_norm_*, through blitzdiff._C: pointers,
sizes and a stream, no torch linkage), "triton" (kernels/triton/group_norm.py, imported on first use) or "auto" (the
fastest one installed for x's device and dtype). The fused kernels read x once for the statistics and once more
for one write of the result, instead of the ~6 passes of F.group_norm plus eager glue, and keep channels-last
tensors channels-last.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import (
    DTYPE_NAMES,
    as_dtype,
    check_backend,
    check_kernel_support,
    choose_backend,
    cpu_kernel,
    device_guard,
    eager_cpu,
    profiled,
    refuse_grad,
)
from ._library import call_cpu, define, launch
from ._library import native as _native_module

BACKENDS = ("ref", "triton", "cuda", "cpu", "auto")
# dtypes the fused kernels take; "ref" takes any floating dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),  # float64 SiLU would need a vectorized exp; "ref" is as fast
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}
_MAX_SAMPLE = 2**31  # the GPU kernels index within a sample in int32


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
    # the affine inside F.group_norm: one pass in eager, and what inductor lowers best (a channels-last 8x128x32x32
    # GroupNorm + SiLU compiled: 0.96 ms against 2.4 ms with the affine as separate ops)
    y = F.group_norm(as_dtype(x, acc), num_groups, None if weight is None else as_dtype(weight, acc),
                     None if bias is None else as_dtype(bias, acc), eps)
    per_sample = (x.shape[0], -1) + (1,) * (x.dim() - 2)  # [B, C, 1, ...]
    if scale is not None:
        y = y * (1.0 + as_dtype(scale, acc).reshape(per_sample))
    if shift is not None:
        y = y + as_dtype(shift, acc).reshape(per_sample)
    if silu:
        y = F.silu(y)
    if residual is not None:
        y = y + as_dtype(residual, acc)
    return as_dtype(y, x.dtype)


# torch's own channels-last contiguity flags (cached on the tensor: 0.1 us, where a movedim view costs 1 us; a
# unet-digits forward asks 30 times): the same rule as a dense movedim(1, -1) view, size-1 dimensions skipped.
_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last(x: Tensor) -> bool:
    """True when x [B, C, *spatial] is stored as a dense [B, *spatial, C] (torch.channels_last for 4-D), and not
    also contiguous; the kernels read and write such tensors in place."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    memory_format = _LAST_FORMATS.get(x.dim())
    if memory_format is not None:
        return x.is_contiguous(memory_format=memory_format)
    return x.movedim(1, -1).is_contiguous()


def _out_like(x: Tensor) -> Tensor:
    """The op's result buffer: x's layout when x is contiguous or channels-last, else contiguous."""
    kept = x.is_contiguous() or _channels_last(x)
    return torch.empty_like(x, memory_format=torch.preserve_format if kept else torch.contiguous_format)


def _as_layout(t: Tensor, like: Tensor) -> Tensor:
    """t (like's shape) in the layout the kernels read like in: channels-last or contiguous; a copy only if needed."""
    if _channels_last(like):
        return t if t.movedim(1, -1).is_contiguous() else t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _check_inputs(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    backend: str,
) -> None:
    """Raise ValueError naming what is wrong and what is allowed; shared by the real and the fake kernel."""
    check_backend("group_norm", backend, BACKENDS)
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"group_norm: x must be a floating [B, C, *spatial] tensor, got {x.dtype} {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(f"group_norm: num_groups must be >= 1 and divide the {channels} channels, got {num_groups}")
    expected = {"weight": (channels,), "bias": (channels,), "scale": (batch, channels), "shift": (batch, channels),
                "residual": tuple(x.shape)}
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift), ("residual", residual)):
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"group_norm: {name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"group_norm: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"group_norm: {name} is on {t.device} but x is on {x.device}")
    if backend not in KERNEL_DTYPES:  # "ref", "auto"
        return
    check_kernel_support("group_norm", backend, x.device, x.dtype, KERNEL_DTYPES)
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(
            f"group_norm: backend {backend!r} needs residual in x's dtype {x.dtype}, got {residual.dtype}; "
            "use backend='ref'"
        )
    if backend != "cpu" and not _fits_int32(x):
        raise ValueError(f"group_norm: backend {backend!r} takes samples of fewer than 2**31 elements; use 'ref'")


def _fits_int32(x: Tensor) -> bool:
    """Whether the GPU kernels can index a sample of x."""
    return x.numel() < _MAX_SAMPLE * max(x.shape[0], 1)


def auto_backend(x: Tensor, residual: Tensor | None = None, *params: Tensor | None) -> str:
    """The fastest backend for x's device and dtype, chosen per call from what is installed, never at import:
    "cpu" on the CPU, "cuda" then "triton" on a GPU (the CUDA kernels launch without Triton's Python overhead), else
    "ref"; also "ref" when the fused kernels cannot take the call (gradients needed, a residual of another dtype)."""
    if residual is not None and residual.dtype != x.dtype:
        return "ref"
    order = ("cpu", "cuda", "triton") if _fits_int32(x) else ("cpu",)
    return choose_backend(x.device, x.dtype, KERNEL_DTYPES, order, x, residual, *params)


def _kernel_args(out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor | None,
                 shift: Tensor | None, residual: Tensor | None, num_groups: int, eps: float, last: bool, silu: bool,
                 pdtype: torch.dtype) -> tuple:
    """The compiled kernels' arguments before the thread count / workspace (csrc/group_norm.h): pointers (0 for an
    absent term), scale / shift batch strides, sizes, flags and the dtypes' names."""
    batch, channels = x.shape[:2]
    return (
        out.data_ptr(), x.data_ptr(), 0 if weight is None else weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        0 if scale is None else scale.data_ptr(), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.data_ptr(), 0 if shift is None else shift.stride(0),
        0 if residual is None else residual.data_ptr(),
        batch, channels, x.numel() // (batch * channels), num_groups, eps, last, silu, DTYPE_NAMES[x.dtype],
        DTYPE_NAMES[pdtype],
    )


def _group_norm_kernel(
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
    backend: str,
) -> Tensor:
    _check_inputs(x, num_groups, weight, bias, scale, shift, residual, backend)
    params = (weight, bias, scale, shift)
    if backend == "auto":
        backend = auto_backend(x, residual, *params)
    if backend == "ref":
        y = group_norm_ref(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu, residual=residual)
        return _as_layout(y, x)
    refuse_grad("group_norm", backend, x, residual, *params)
    last = _channels_last(x)
    x = _as_layout(x, x)
    out = _out_like(x)
    if x.numel() == 0:
        return out
    residual = None if residual is None else _as_layout(residual, x)
    # Parameters are read as x's dtype when all of them have it, else all as the float32 (float64) the spec
    # converts them to; scale / shift keep their batch stride (a chunk of the time projection is read in place).
    acc = torch.promote_types(x.dtype, torch.float32)
    pdtype = x.dtype if all(p is None or p.dtype == x.dtype for p in params) else acc
    converted = (None if p is None else p.to(pdtype) for p in params)
    weight, bias, scale, shift = (p if p is None or p.stride(-1) == 1 else p.contiguous() for p in converted)
    if backend == "triton":
        from .triton.group_norm import group_norm_triton

        with device_guard(x.device):
            group_norm_triton(out, x, num_groups, weight, bias, eps, scale, shift, silu, residual, last)
        return out
    args = _kernel_args(out, x, weight, bias, scale, shift, residual, num_groups, eps, last, silu, pdtype)
    if backend == "cpu":
        launch("group_norm", "cpu", x.device, *args, threaded=True)
        return out
    size = _native_module("group_norm", "cuda").group_norm_cuda_workspace(x.shape[0], x.shape[1],
                                                                          math.prod(x.shape[2:]), num_groups,
                                                                          DTYPE_NAMES[x.dtype])
    workspace = torch.empty(size, dtype=torch.uint8, device=x.device)  # on x.device's current stream
    launch("group_norm", "cuda", x.device, *args, workspace.data_ptr(), size)
    return out


def group_norm_module_cpu(
    x: Tensor,
    num_groups: int,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = False,
) -> Tensor | None:
    """A model's own GroupNorm by the "cpu" kernel, called directly: group_norm(..., backend="cpu")'s result, or None
    where the op must run the call instead.

    For the modules' calls in eager sampling: weight, bias are an nn.GroupNorm's [C] parameters, so per call only
    what varies is looked at (x's device, dtype, layout and channels; scale / shift [B, C]). Through the op, its
    dispatch, checks and backend choice cost ~20 us a call, more than the kernel at a batch-1 UNet's sizes (a
    channels-last 1x64x8x8 GroupNorm + SiLU: 3.6 us by the kernel, 11.9 by the spec). None under tracing or
    torch.compile, a dispatch mode or a tensor subclass, for gradients, other dtypes or devices, a layout the
    kernel would read by copy, or without blitzdiff._C.
    """
    dtype = x.dtype
    if dtype not in KERNEL_DTYPES["cpu"] or not eager_cpu(x) or x.dim() < 3:
        return None
    batch, channels = x.shape[:2]
    if (weight.dtype != dtype or bias.dtype != dtype or weight.shape != (channels,) or bias.shape != (channels,)
            or not (weight.is_contiguous() and bias.is_contiguous()) or channels % num_groups
            or (scale is not None and not _modulation_taken(scale, batch, channels, dtype))
            or (shift is not None and not _modulation_taken(shift, batch, channels, dtype))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad
                                             or (scale is not None and scale.requires_grad)
                                             or (shift is not None and shift.requires_grad)))):
        return None
    last = _channels_last(x)
    if not (last or x.is_contiguous()):
        return None
    kernel = cpu_kernel("group_norm_cpu")
    if kernel is None:
        return None
    out = torch.empty_like(x)  # dense, contiguous or channels-last: empty_like keeps x's strides
    if out.numel():
        with profiled("group_norm"):
            call_cpu(kernel, *_kernel_args(out, x, weight, bias, scale, shift, None, num_groups, eps, last, silu,
                                           dtype), torch.get_num_threads(), keep=(out, x, weight, bias, scale, shift))
    return out


def _modulation_taken(p: Tensor, batch: int, channels: int, dtype: torch.dtype) -> bool:
    """Whether the kernels read an AdaGN scale / shift in place: [B, C] of x's dtype, unit stride along C."""
    return p.dtype == dtype and p.shape == (batch, channels) and p.stride(1) == 1


def _group_norm_fake(
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
    backend: str,
) -> Tensor:
    _check_inputs(x, num_groups, weight, bias, scale, shift, residual, backend)
    return _out_like(x)


_group_norm_op = define(
    "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, *, Tensor? scale=None, "
    "Tensor? shift=None, bool silu=False, Tensor? residual=None, str backend) -> Tensor",
    _group_norm_kernel,
    _group_norm_fake,
)


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
    """group_norm_ref's result computed by `backend` (see BACKENDS): `blitzdiff::group_norm`.

    x: [B, C, *spatial]; weight, bias: [C] or None; scale, shift: [B, C] or None; residual: x's shape or None.
    "cpu" takes float32 / bfloat16, "cuda" float16 / bfloat16 / float32 / float64, "triton" float16 / bfloat16 /
    float32 (CUDA tensors, or CPU ones under TRITON_INTERPRET=1); "auto" picks the fastest of these for the call.
    A kernel backend needs the residual in x's dtype and refuses inputs that require grad while grad mode is on.
    Returns a new tensor of x's shape and dtype, channels-last when x is, else contiguous. "ref" runs the spec's
    PyTorch ops themselves, not the op, so export, autograd and torch.compile's fusion see ordinary ops.
    """
    if backend == "ref":
        _check_inputs(x, num_groups, weight, bias, scale, shift, residual, backend)
        return group_norm_ref(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu, residual=residual)
    return _group_norm_op(
        x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu, residual=residual, backend=backend
    )
