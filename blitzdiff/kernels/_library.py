"""The `blitzdiff` torch.library namespace that every kernels/<op>.py defines its op in (ARCHITECTURE.md contract 5).

Ops are registered one level below `torch.library.custom_op`: a schema (`Library.define`), one Python kernel for
every device (`CompositeExplicitAutograd`, as custom_op does, so the "ref" backend runs anywhere) and a fake
kernel (`register_fake`, which also serves the Meta device). torch.compile, CUDA graphs, export and opcheck see the
same single op either way; what differs is the per-call cost. custom_op also routes every call through a Python
autograd kernel and its own argument handling: 17-18 us per call against 8-9 us here, of which about 4 us is the
Python kernel itself (solver_update and gaussian_noise on tiny CPU tensors, 2-core AMD EPYC, torch 2.13; the
"op cpu" minus "_C kernel" rows of benchmarks/bench_gaussian_noise.py show it).

Autograd is a fallthrough (no per-call cost): the ops are for sampling, not training. Eagerly, the "ref" backend's
PyTorch ops record gradients as usual; the compiled kernels are not differentiable, and an op refuses inputs that
require grad for them, rather than PyTorch's deprecated fallback, which warns on backward and returns no gradient.
"""

import importlib
import sys
import threading
from collections.abc import Callable

import torch

NAMESPACE = "blitzdiff"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # module-level: the registrations live as long as it does


def define(schema: str, kernel: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define `blitzdiff::<schema>` with `kernel` for every device and `fake` for meta / fake tensors.

    Returns the op's default overload, the cheapest callable to dispatch through.
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")  # not differentiable: outputs never need grad
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(torch.ops.blitzdiff, name).default


# blitzdiff._C's failed import, kept for the process: Python does not remember a failed import, and each retry
# searched sys.path again, on every "auto" direct kernel call of a process without the build (a GroupNorm direct
# call's decline took 16 us, 3 us with the failure kept; a unet-digits forward makes 30).
_import_error: ImportError | None = None
_BUILD_HINT = "build it with `pip install -e . --no-build-isolation` from the repository root, or use backend='ref'"


def native(op: str, backend: str):
    """blitzdiff._C for `op`'s "cpu" / "cuda" backend, imported on first use (the package imports without it).

    Raises RuntimeError saying how to build it when the module, or its CUDA part, is missing.
    """
    global _import_error
    module = sys.modules.get("blitzdiff._C")  # imported: no importlib call (a kernel launch pays this lookup)
    if module is None:
        error = _import_error  # chained below, never re-raised: a re-raise would grow its traceback every call
        if error is None:
            try:
                module = importlib.import_module("blitzdiff._C")
            except ImportError as e:
                error = e
                if "blitzdiff._C" not in sys.modules:  # not a test's stand-in (sys.modules["blitzdiff._C"] = None)
                    _import_error = e
        if module is None:
            raise RuntimeError(f"{op}: the compiled extension blitzdiff._C is missing; {_BUILD_HINT}") from error
    if backend == "cuda" and not module.has_cuda:
        raise RuntimeError(
            f"{op}: blitzdiff._C was built without CUDA (no nvcc found, or -DBLITZDIFF_CUDA=OFF); "
            f"put nvcc on PATH (or set CUDACXX) and rebuild: {_BUILD_HINT}"
        )
    return module


# .recorder: the CPU graph capture running on this thread (blitzdiff.engine.cpu_graph), if any
_capture = threading.local()


def set_recorder(recorder) -> None:
    """Make `recorder` (an object with native(kernel, args, keep), or None) see this thread's direct kernel calls."""
    _capture.recorder = recorder


def call_cpu(kernel, *args, keep: tuple = ()) -> None:
    """kernel(*args): a direct CPU kernel call whose pointer arguments point into `keep`'s tensors. A CPU graph
    capture running on this thread records it (and holds `keep`), to call it again on replay."""
    recorder = getattr(_capture, "recorder", None)
    if recorder is not None:
        recorder.native(kernel, args, keep)
    kernel(*args)


def launch(op: str, backend: str, device: torch.device, *args, kernel: str | None = None,
           threaded: bool = False, keep: tuple | None = None) -> None:
    """Call blitzdiff._C's `<kernel>_<backend>` (kernel defaults to `op`), "cpu" or "cuda", with `args`.

    The CUDA entry also takes torch's current stream of `device` as its last argument, and `device` is made current
    for the call: the kernel launches in the current CUDA context, on that stream (graph capture, side streams).
    threaded: the CPU entry also takes a thread count as its last argument, torch.get_num_threads() (its kernels
    split work over torch's OpenMP threads, csrc/parallel.h, with the same bits for any count).
    keep: a model's direct CPU call, with the tensors its pointers point into: through call_cpu, which a CPU graph
    capture records.
    """
    function = getattr(native(op, backend), f"{kernel or op}_{backend}")
    if backend == "cpu":
        args = (*args, *((torch.get_num_threads(),) if threaded else ()))
        if keep is None:
            function(*args)
        else:
            call_cpu(function, *args, keep=keep)
        return
    with torch.cuda.device(device):
        function(*args, torch.cuda.current_stream(device).cuda_stream)
