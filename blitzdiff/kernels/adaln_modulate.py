"""adaLN modulation for DiT blocks (Peebles & Xie 2023): LayerNorm without affine, then per-sample scale / shift;
and the adaLN-Zero gated residual, residual + gate * branch.

Two ops, `blitzdiff::adaln_modulate` and `blitzdiff::adaln_gated_residual` (a separate op rather than an option:
a DiT block modulates before its attention / MLP branch and gates after it, with the branch in between, so the
two never fuse into one pass). `<op>_ref` is each one's specification (pure PyTorch); the "cpu", "cuda" and
"triton" backends run one pass per row (token): x read once, statistics in float32 or better, half types rounded
once. shift / scale / gate may be column chunks of the [B, 6D] modulation vector: they are read in place. "auto"
picks the fastest backend built for the tensors' device and dtype, per call (never at import).
"""

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

BACKENDS = ("ref", "cpu", "cuda", "triton", "auto")
# dtypes the compiled kernels take; "ref" takes any floating dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}
AUTO_ORDER = ("cuda", "triton", "cpu")


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x: [B, N, D]; shift, scale: [B, D] -> LayerNorm(x) * (1 + scale) + shift, [B, N, D].

    Statistics in (at least) float32 whatever x's dtype; the result has x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    y = F.layer_norm(as_dtype(x, acc), x.shape[-1:], None, None, eps)
    return as_dtype(y * (1.0 + as_dtype(scale, acc)[:, None]) + as_dtype(shift, acc)[:, None], x.dtype)


def adaln_gated_residual_ref(residual: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """residual, y: [B, N, D]; gate: [B, D] -> residual + gate[:, None] * y, [B, N, D] (DiT's adaLN-Zero residual).

    float16 / bfloat16 compute in float32 and round once; the result has residual's dtype.
    """
    acc = torch.promote_types(residual.dtype, torch.float32)
    return as_dtype(as_dtype(residual, acc) + as_dtype(gate, acc)[:, None] * as_dtype(y, acc), residual.dtype)


def _check_inputs(op: str, rows: tuple[tuple[str, Tensor], ...], params: tuple[tuple[str, Tensor], ...],
                  backend: str) -> None:
    """ValueError naming what is wrong: `rows` are [B, N, D] tensors, `params` [B, D]; all of one dtype and device."""
    check_backend(op, backend, BACKENDS)
    (first_name, first), *others = rows
    if first.dim() != 3:
        raise ValueError(f"{op}: {first_name} must be [B, N, D], got shape {tuple(first.shape)}")
    if not first.is_floating_point():
        raise ValueError(f"{op}: tensors must be floating point, got {first.dtype}")
    batch, _, dim = first.shape
    shapes = [(name, t, tuple(first.shape)) for name, t in others] + [(name, t, (batch, dim)) for name, t in params]
    for name, t, expected in shapes:
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name}.dtype {t.dtype} differs from {first_name}.dtype {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    check_kernel_support(op, backend, first.device, first.dtype, KERNEL_DTYPES)


def _check_modulate(x: Tensor, shift: Tensor, scale: Tensor, backend: str) -> None:
    _check_inputs("adaln_modulate", (("x", x),), (("shift", shift), ("scale", scale)), backend)


def _check_gated(residual: Tensor, y: Tensor, gate: Tensor, backend: str) -> None:
    _check_inputs("adaln_gated_residual", (("residual", residual), ("y", y)), (("gate", gate),), backend)


def _param_rows(*params: Tensor) -> tuple[list[Tensor], int]:
    """The [B, D] parameters as the kernels read them: unit stride along D and one row stride shared by all (the
    chunks of one modulation vector are read in place; anything else is copied)."""
    if all(p.stride(1) == 1 and p.stride(0) == params[0].stride(0) for p in params):
        return list(params), params[0].stride(0)
    params = [p.contiguous() for p in params]
    return params, params[0].shape[1]


def _launch(op: str, backend: str, out: Tensor, rows: tuple[Tensor, ...], params: tuple[Tensor, ...],
            *scalars: float) -> Tensor:
    """Run `op`'s kernel of `backend` writing `out` ([B, N, D] contiguous) from contiguous `rows` and `params`."""
    params, param_stride = _param_rows(*params)
    batch, tokens, dim = out.shape
    if out.numel() == 0:
        return out
    if backend == "triton":
        from .triton import adaln_modulate as triton_kernels  # lazy: triton is optional

        with device_guard(out.device):
            getattr(triton_kernels, op)(out, *rows, *params, *scalars)
        return out
    launch(op, backend, out.device, *_kernel_args(out, rows, params, param_stride, scalars), threaded=True)
    return out


def _kernel_args(out: Tensor, rows: tuple[Tensor, ...], params: tuple[Tensor, ...], param_stride: int,
                 scalars: tuple[float, ...]) -> tuple:
    """The compiled kernels' arguments before the thread count / stream (csrc/adaln_modulate.h): pointers, rows,
    tokens, dim, the parameters' row stride, `scalars` (eps) and the dtype's name."""
    batch, tokens, dim = out.shape
    return (out.data_ptr(), *[t.data_ptr() for t in (*rows, *params)], batch * tokens, tokens, dim, param_stride,
            *scalars, DTYPE_NAMES[out.dtype])


def _adaln_modulate_kernel(x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, backend: str) -> Tensor:
    _check_modulate(x, shift, scale, backend)
    if backend == "auto":
        backend = choose_backend(x.device, x.dtype, KERNEL_DTYPES, AUTO_ORDER, x, shift, scale)
    if backend == "ref":
        return adaln_modulate_ref(x, shift, scale, eps).contiguous()
    refuse_grad("adaln_modulate", backend, x, shift, scale)
    x = x.contiguous()
    out = torch.empty_like(x)
    return _launch("adaln_modulate", backend, out, (x,), (shift, scale), eps)


def _adaln_modulate_fake(x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, backend: str) -> Tensor:
    _check_modulate(x, shift, scale, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gated_kernel(residual: Tensor, y: Tensor, gate: Tensor, *, backend: str) -> Tensor:
    _check_gated(residual, y, gate, backend)
    if backend == "auto":
        backend = choose_backend(residual.device, residual.dtype, KERNEL_DTYPES, AUTO_ORDER, residual, y, gate)
    if backend == "ref":
        return adaln_gated_residual_ref(residual, y, gate).contiguous()
    refuse_grad("adaln_gated_residual", backend, residual, y, gate)
    residual, y = residual.contiguous(), y.contiguous()
    out = torch.empty_like(residual)
    return _launch("adaln_gated_residual", backend, out, (residual, y), (gate,))


def _gated_fake(residual: Tensor, y: Tensor, gate: Tensor, *, backend: str) -> Tensor:
    _check_gated(residual, y, gate, backend)
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


_adaln_modulate_op = define(
    "adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps, *, str backend) -> Tensor",
    _adaln_modulate_kernel,
    _adaln_modulate_fake,
)
_gated_op = define(
    "adaln_gated_residual(Tensor residual, Tensor y, Tensor gate, *, str backend) -> Tensor",
    _gated_kernel,
    _gated_fake,
)


def _run_direct(op: str, rows: tuple[Tensor, ...], params: tuple[Tensor, ...], *scalars: float) -> Tensor | None:
    """`op`'s "cpu" kernel called directly (no op dispatch, no argument checks beyond these): a new [B, N, D] result,
    or None where the op must run the call. Taken: eager CPU tensors, `rows` contiguous [B, N, D] of one kernel
    dtype, `params` [B, D] of that dtype with unit stride along D and one row stride, no gradient to record, and
    blitzdiff._C built."""
    x = rows[0]
    dtype = x.dtype
    if dtype not in KERNEL_DTYPES["cpu"] or not eager_cpu(x) or x.dim() != 3:
        return None
    shape = x.shape
    batch, dim = shape[0], shape[2]
    stride = params[0].stride(0)
    grad = torch.is_grad_enabled()
    # plain loops: any() over generators cost ~1 us a call here, a fifth of a batch-1 DiT-digits modulation
    for t in rows:
        if t.dtype != dtype or t.shape != shape or not t.is_contiguous() or (grad and t.requires_grad):
            return None
    for p in params:
        if p.dtype != dtype or p.shape != (batch, dim) or p.stride() != (stride, 1) or (grad and p.requires_grad):
            return None
    kernel = cpu_kernel(f"{op}_cpu")
    if kernel is None:
        return None
    out = torch.empty_like(x)
    if out.numel():
        with profiled(op):
            call_cpu(kernel, *_kernel_args(out, rows, params, stride, scalars), torch.get_num_threads(),
                     keep=(out, *rows, *params))
    return out


def adaln_modulate_module_cpu(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor | None:
    """A DiT block's own modulation by the "cpu" kernel, called directly: adaln_modulate(..., backend="cpu")'s
    result, or None where the op must run the call instead (as group_norm_module_cpu: the op's dispatch and checks
    cost more than the kernel at batch-1 sizes). x [B, N, D] contiguous; shift, scale [B, D] rows of x's dtype with
    unit stride along D and one row stride (chunks of the block's modulation vector). None under tracing or
    torch.compile, a dispatch mode or a tensor subclass, for gradients, other dtypes or layouts, or without
    blitzdiff._C."""
    return _run_direct("adaln_modulate", (x,), (shift, scale), eps)


def adaln_gated_residual_module_cpu(residual: Tensor, y: Tensor, gate: Tensor) -> Tensor | None:
    """A DiT block's own gated residual, residual + gate[:, None] * y, by the "cpu" kernel called directly (one pass
    instead of an index, a multiply and an add; for float32 the same bits as those torch ops, which multiply then
    add with one rounding each), or None as adaln_modulate_module_cpu. residual, y [B, N, D] contiguous; gate [B, D]
    with unit stride along D."""
    return _run_direct("adaln_gated_residual", (residual, y), (gate,))


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *, backend: str = "ref") -> Tensor:
    """adaln_modulate_ref's result by `backend` ("auto", "ref", "cpu", "cuda" or "triton"): `blitzdiff::adaln_modulate`.

    x: [B, N, D]; shift, scale: [B, D] (any row stride), all of x's dtype and device. "cpu" takes float32 /
    float64, "cuda" also float16 / bfloat16, "triton" float16 / bfloat16 / float32 (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1); "auto" picks the fastest of these for the call, "ref" where none can take it (or gradients
    are needed). Returns a new tensor, contiguous from the op; "ref" runs the spec's PyTorch ops themselves, not the
    op, so export, autograd and torch.compile's fusion see ordinary ops.
    """
    if backend == "ref":
        _check_modulate(x, shift, scale, backend)
        return adaln_modulate_ref(x, shift, scale, eps)
    return _adaln_modulate_op(x, shift, scale, eps, backend=backend)


def adaln_gated_residual(residual: Tensor, y: Tensor, gate: Tensor, *, backend: str = "ref") -> Tensor:
    """residual + gate[:, None] * y by `backend` (as adaln_modulate): `blitzdiff::adaln_gated_residual`.

    residual, y: [B, N, D]; gate: [B, D] (any row stride). Returns a new tensor, contiguous from the op.
    """
    if backend == "ref":
        _check_gated(residual, y, gate, backend)
        return adaln_gated_residual_ref(residual, y, gate)
    return _gated_op(residual, y, gate, backend=backend)
