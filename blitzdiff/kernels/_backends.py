"""What every kernels/<op>.py shares about backends (ARCHITECTURE.md contract 5): their names, what is installed
here, the "auto" choice, and the checks made before a compiled kernel runs (dtype, device, gradients).

All of it is decided per call from the inputs and what is installed, never at import.
"""

import contextlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._library import native

ALL_BACKENDS = ("ref", "triton", "cuda", "cpu", "auto")  # each op lists the ones it has (its BACKENDS)
# dtype -> the name the compiled kernels take ("float32", ...): a dict lookup costs 0.02 us, str(dtype) 0.07 us plus
# the prefix strip, on every direct kernel call of an eager batch-1 forward
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.")
               for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def check_backend(op: str, backend: str, available: Sequence[str]) -> None:
    """ValueError unless `op` has `backend`, listing the backends it has."""
    if backend not in available:
        raise ValueError(f"{op}: no backend {backend!r}; allowed: {', '.join(available)}")


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`: t itself when it has it already, as t.to(dtype) returns, without the dispatcher call (the eager
    specs run many such no-op casts per forward, and at batch 1 on the CPU their call cost shows)."""
    return t if t.dtype == dtype else t.to(dtype)


def eager_tensor(x: Tensor) -> bool:
    """Whether a call on x runs eagerly on a plain tensor: not traced (torch.jit.trace records only the ops it sees) or
    compiled, no tensor subclass (fake tensors), no dispatch mode. Only there may a model bypass what those see: an
    op (eager_cpu), its own parameters (models.packing) or PyTorch's convolution call (models.conv)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and _get_current_dispatch_mode() is None)


def eager_cpu(x: Tensor) -> bool:
    """eager_tensor on a CPU tensor: only there may a model call a CPU kernel directly instead of through its op."""
    return x.is_cpu and eager_tensor(x)  # is_cpu: 0.05 us, device.type 0.3


def module_call(backend: str, direct, spec, op, x: Tensor, *args, **kwargs) -> Tensor:
    """A model's own call of a kernel op on x (its parameters and shapes are the module's, already right):

    - "auto": `direct(x, ...)`, the CPU kernel called without the op (its dispatch and checks cost more than the
      kernel at batch-1 sizes), when it takes the call (it returns None for anything the op must run);
    - "ref", and "auto" while torch.compile traces on the CPU: `spec(x, ...)`, the PyTorch spec itself (the op's
      argument checks would repeat what the module guarantees; inductor fuses the spec's ops into its own loops,
      where a kernel would be an opaque call between them);
    - otherwise `op(x, ..., backend=backend)`.
    """
    if backend == "auto" and (out := direct(x, *args, **kwargs)) is not None:
        return out
    if backend == "ref" or (backend == "auto" and x.device.type == "cpu" and torch.compiler.is_compiling()):
        return spec(x, *args, **kwargs)
    return op(x, *args, **kwargs, backend=backend)


def profiled(op: str):
    """A profiler range named `blitzdiff::<op>` around a direct kernel call while torch's profiler runs (so profiles
    show the kernel as they show the op), else nothing."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(f"blitzdiff::{op}")
    return contextlib.nullcontext()


def cpu_kernel(name: str):
    """blitzdiff._C's function `name` when the extension is built, else None (a missing build is not an error here:
    the caller runs the op, which explains it)."""
    module = sys.modules.get("blitzdiff._C")
    if module is None and not backend_installed("cpu"):
        return None
    return getattr(module or sys.modules["blitzdiff._C"], name)


def triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1; read per call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_devices(backend: str) -> tuple[str, ...]:
    """Device types a compiled backend runs on: its own; for "triton", CUDA and, under Triton's interpreter, the CPU."""
    if backend == "triton":
        return ("cuda", "cpu") if triton_interpreted() else ("cuda",)
    return (backend,)


def backend_installed(backend: str) -> bool:
    """Whether `backend` ("cpu", "cuda" or "triton") can run here: blitzdiff._C built (with its CUDA part for
    "cuda"), or the triton package found."""
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    try:
        native("blitzdiff.kernels", backend)  # the op name only labels the error, which is not shown
    except RuntimeError:  # not built, or built without CUDA
        return False
    return True


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a gradient through any of `tensors` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_grad(op: str, backend: str, *tensors: Tensor | None) -> None:
    """ValueError when autograd would need a gradient through a compiled kernel: the ops' Autograd key is a
    fallthrough (kernels/_library.py), so fail here rather than silently drop the gradient."""
    if needs_grad(*tensors):
        raise ValueError(f"{op}: backend {backend!r} is not differentiable and an input requires grad; use "
                         "backend='ref', or call it under torch.no_grad() / torch.inference_mode()")


def check_device(op: str, backend: str, device: torch.device, *, inputs: str = "tensors") -> None:
    """ValueError unless `backend`'s kernel runs on `device`; `inputs` names the tensors in the message."""
    devices = backend_devices(backend)
    if device.type not in (*devices, "meta"):  # meta: shape propagation without data, any backend
        hint = "; the CPU needs TRITON_INTERPRET=1" if backend == "triton" else ""
        raise ValueError(f"{op}: backend {backend!r} needs {inputs} on {' or '.join(devices)}, got {device}{hint}")


def check_kernel_support(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                         kernel_dtypes: Mapping[str, Sequence[torch.dtype]], *, inputs: str = "tensors") -> None:
    """ValueError unless `backend`'s kernel takes `dtype` on `device`; backends without kernel dtypes ("ref",
    "auto") take everything."""
    if backend not in kernel_dtypes:
        return
    allowed = kernel_dtypes[backend]
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{op}: backend {backend!r} takes {names}, got {dtype}; use backend='ref'")
    check_device(op, backend, device, inputs=inputs)


def choose_backend(device: torch.device, dtype: torch.dtype, kernel_dtypes: Mapping[str, Sequence[torch.dtype]],
                   order: Sequence[str], *grad_inputs: Tensor | None) -> str:
    """The backend "auto" runs: the first of `order` with a kernel for `dtype` on `device` that is installed here,
    else "ref"; also "ref" when autograd needs a gradient through one of `grad_inputs` (the kernels have none).

    "triton" is chosen on CUDA devices only: its CPU interpreter is a test tool, never picked.
    """
    if needs_grad(*grad_inputs):
        return "ref"
    for backend in order:
        runs_on = "cuda" if backend == "triton" else backend
        if device.type == runs_on and dtype in kernel_dtypes.get(backend, ()) and backend_installed(backend):
            return backend
    return "ref"


def device_guard(device: torch.device):
    """Make `device` current for a Triton launch (a CUDA device); nothing to do elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
