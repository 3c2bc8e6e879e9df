"""Fused solver update: out = a*x + b*d0 + c*d1 + s*noise (ARCHITECTURE.md contracts 2 and 5).

The linear update a solver plan step reduces to, in one pass over memory instead of seven eager ops.
`solver_update_ref` is the specification (pure PyTorch, runs anywhere, what export traces); the "cpu" and "cuda"
backends run the csrc/ kernels through `blitzdiff._C`, which takes raw pointers, an element count and a stream,
so it never links to torch. One `torch.library` op covers all backends, so torch.compile, CUDA graphs and export
see a single node; the backend is an explicit argument, never chosen at import.
"""

import torch
from torch import Tensor

from ._backends import DTYPE_NAMES, check_backend, check_kernel_support, refuse_grad
from ._library import define, launch

BACKENDS = ("ref", "cpu", "cuda")
# dtypes the compiled kernels take; "ref" takes any floating dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def solver_update_ref(
    x: Tensor, d0: Tensor, d1: Tensor | None, noise: Tensor | None, a: float, b: float, c: float, s: float
) -> Tensor:
    """a*x + b*d0 [+ c*d1] [+ s*noise], summed left to right; a term is present iff its tensor is not None.

    All tensors share x's shape, dtype and device. float16 / bfloat16 accumulate in float32 and round once at the
    end; float32 and float64 accumulate in their own precision. Returns a new tensor of x's dtype.
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = a * x.to(acc) + b * d0.to(acc)
    if d1 is not None:
        out = out + c * d1.to(acc)
    if noise is not None:
        out = out + s * noise.to(acc)
    return out.to(x.dtype)


def _check_inputs(
    x: Tensor, d0: Tensor, d1: Tensor | None, noise: Tensor | None, c: float, s: float, backend: str
) -> None:
    """Raise ValueError naming what is wrong and what is allowed; shared by the real and the fake kernel."""
    check_backend("solver_update", backend, BACKENDS)
    for name, t, coef in (("d1", d1, c), ("noise", noise, s)):
        if t is None and coef != 0.0:
            raise ValueError(f"solver_update: {name} is None but its coefficient is {coef}; pass {name} or 0.0")
    for name, t in (("d0", d0), ("d1", d1), ("noise", noise)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"solver_update: {name}.shape {tuple(t.shape)} differs from x.shape {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"solver_update: {name}.dtype {t.dtype} differs from x.dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"solver_update: {name} is on {t.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise ValueError(f"solver_update: tensors must be floating point, got {x.dtype}")
    check_kernel_support("solver_update", backend, x.device, x.dtype, KERNEL_DTYPES)


def _solver_update_kernel(
    x: Tensor,
    d0: Tensor,
    d1: Tensor | None,
    noise: Tensor | None,
    a: float,
    b: float,
    c: float,
    s: float,
    *,
    backend: str,
) -> Tensor:
    _check_inputs(x, d0, d1, noise, c, s, backend)
    if backend == "ref":
        return solver_update_ref(x, d0, d1, noise, a, b, c, s).contiguous()
    refuse_grad("solver_update", backend, x, d0, d1, noise)
    # The kernels walk flat memory: inputs must be dense, the output is fresh (never aliases an input).
    x, d0 = x.contiguous(), d0.contiguous()
    d1 = None if d1 is None else d1.contiguous()
    noise = None if noise is None else noise.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    args = (
        out.data_ptr(),
        x.data_ptr(),
        d0.data_ptr(),
        0 if d1 is None else d1.data_ptr(),  # null pointer: the kernel drops the term
        0 if noise is None else noise.data_ptr(),
        x.numel(),
        DTYPE_NAMES[x.dtype],
        a,
        b,
        c,
        s,
    )
    launch("solver_update", backend, x.device, *args)
    return out


def _solver_update_fake(
    x: Tensor,
    d0: Tensor,
    d1: Tensor | None,
    noise: Tensor | None,
    a: float,
    b: float,
    c: float,
    s: float,
    *,
    backend: str,
) -> Tensor:
    _check_inputs(x, d0, d1, noise, c, s, backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_solver_update_op = define(
    "solver_update(Tensor x, Tensor d0, Tensor? d1, Tensor? noise, float a, float b, float c, float s, *, "
    "str backend) -> Tensor",
    _solver_update_kernel,
    _solver_update_fake,
)


def solver_update(
    x: Tensor,
    d0: Tensor,
    d1: Tensor | None,
    noise: Tensor | None,
    a: float,
    b: float,
    c: float,
    s: float,
    *,
    backend: str,
) -> Tensor:
    """out = a*x + b*d0 + c*d1 + s*noise, by `backend` ("ref", "cpu" or "cuda"): `blitzdiff::solver_update`.

    x, d0, d1, noise: same shape, dtype and device; d1 (noise) may be None when c (s) is 0.0. Non-contiguous
    inputs are copied to contiguous ones first. Returns a new contiguous tensor of x's shape and dtype.
    """
    return _solver_update_op(x, d0, d1, noise, a, b, c, s, backend=backend)
