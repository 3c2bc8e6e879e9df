"""The tanh-approximate GELU of DiT's MLP (diffusers' GELU(approximate="tanh")): `blitzdiff::gelu_tanh`.

    gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)),   z = sqrt(2 / pi) (x + 0.044715 x^3)

`gelu_tanh_ref` is the specification: torch's own F.gelu(x, approximate="tanh"). The kernels compute the second
form (no cancellation in 1 + tanh(z) for negative x) in float32 or better. Why a kernel for one elementwise op:
torch's CPU tanh GELU runs several times slower than its erf GELU (a [16, 64, 384] float32 tensor on 2 threads of a
Sapphire Rapids Xeon, torch 2.13: 305 us against 65; csrc/gelu_cpu.cpp does it in about 100), and a DiT block runs
one per forward. "auto" picks the "cpu" kernel for CPU tensors; elsewhere it runs torch's GELU (the "cuda" and
"triton" kernels exist so that every backend runs a whole DiT; they are not measured against torch's).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import (
    DTYPE_NAMES,
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
AUTO_ORDER = ("cpu",)  # see the module docstring: torch's GELU on GPUs


def gelu_tanh_ref(x: Tensor) -> Tensor:
    """x: any shape -> F.gelu(x, approximate="tanh"), x's shape and dtype."""
    return F.gelu(x, approximate="tanh")


def _check(x: Tensor, backend: str) -> None:
    """ValueError naming what is wrong: the backend, a floating x, a dtype and device the backend's kernel takes."""
    check_backend("gelu_tanh", backend, BACKENDS)
    if not x.is_floating_point():
        raise ValueError(f"gelu_tanh: x must be floating point, got {x.dtype}")
    check_kernel_support("gelu_tanh", backend, x.device, x.dtype, KERNEL_DTYPES, inputs="x")


def _run(backend: str, out: Tensor, x: Tensor) -> Tensor:
    """`backend`'s kernel over the contiguous x into the contiguous out (which may be x)."""
    if out.numel() == 0:
        return out
    if backend == "triton":
        from .triton import gelu as triton_kernels  # lazy: triton is optional

        with device_guard(out.device):
            triton_kernels.gelu_tanh(out, x)
        return out
    launch("gelu_tanh", backend, out.device, out.data_ptr(), x.data_ptr(), out.numel(),
           DTYPE_NAMES[out.dtype], threaded=True)
    return out


def _gelu_tanh_kernel(x: Tensor, *, backend: str) -> Tensor:
    _check(x, backend)
    if backend == "auto":
        backend = choose_backend(x.device, x.dtype, KERNEL_DTYPES, AUTO_ORDER, x)
    if backend == "ref":
        return gelu_tanh_ref(x).contiguous()
    refuse_grad("gelu_tanh", backend, x)
    x = x.contiguous()
    return _run(backend, torch.empty_like(x), x)


def _gelu_tanh_fake(x: Tensor, *, backend: str) -> Tensor:
    _check(x, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_gelu_tanh_op = define("gelu_tanh(Tensor x, *, str backend) -> Tensor", _gelu_tanh_kernel, _gelu_tanh_fake)


def gelu_tanh_module_cpu(x: Tensor) -> Tensor | None:
    """A DiT MLP's own GELU by the "cpu" kernel, called directly and in place on x, the MLP's fresh projection
    output: x, now gelu_tanh(x, backend="cpu")'s result, or None (x untouched) where the op must run the call (as
    group_norm_module_cpu: the op's dispatch and checks cost more than the kernel at batch 1). None under tracing or
    torch.compile, a dispatch mode or a tensor subclass, for gradients, other dtypes, a non-contiguous x, or without
    blitzdiff._C."""
    if (not eager_cpu(x) or x.dtype not in KERNEL_DTYPES["cpu"] or not x.is_contiguous()
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    kernel = cpu_kernel("gelu_tanh_cpu")
    if kernel is None:
        return None
    if x.numel():
        with profiled("gelu_tanh"):
            call_cpu(kernel, x.data_ptr(), x.data_ptr(), x.numel(), DTYPE_NAMES[x.dtype], torch.get_num_threads(),
                     keep=(x,))
    return x


def gelu_tanh(x: Tensor, *, backend: str = "ref") -> Tensor:
    """gelu_tanh_ref(x) by `backend` ("auto", "ref", "cpu", "cuda" or "triton"): `blitzdiff::gelu_tanh`.

    x: any shape. "cpu" takes float32 / float64, "cuda" also float16 / bfloat16, "triton" float16 / bfloat16 /
    float32 (CUDA tensors, or CPU ones under TRITON_INTERPRET=1); "auto" runs "cpu" for CPU tensors it takes and
    "ref" otherwise (and where gradients are needed). Returns a new tensor, contiguous from the op; "ref" runs
    torch's GELU itself, not the op, so export, autograd and torch.compile's fusion see an ordinary op.
    """
    if backend == "ref":
        _check(x, backend)
        return gelu_tanh_ref(x)
    return _gelu_tanh_op(x, backend=backend)
