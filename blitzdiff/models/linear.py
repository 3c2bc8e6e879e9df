"""The models' linear layers: nn.Linear whose eager CPU float32 calls with at most DIRECT_MAX_IN_FEATURES inputs run
blitzdiff's register-tiled kernel (blitzdiff._C.Conv2dNhwc, csrc/conv2d_cpu.cpp, as a 1x1 convolution over the
rows) from a weight blocked once (conv.direct_kernel), instead of PyTorch's addmm (MKL's sgemm on x86 wheels).

Measured on a 2-core AMD EPYC (Zen 4), torch 2.13 (benchmarks/kernels/bench_linear.py, README "Linear layers"):
with 96-512 inputs the kernel took 0.86-0.96x addmm's time at the embedded models' and SD 1.5's shapes (16-8192
rows), its largest error 1.5-4.5x addmm's; with 1152 and 4608 inputs (DiT-XL/2) 0.84x and 0.97x, its error 9x and
12x addmm's (one multiply-add chain per output, where MKL sums in blocks), hence the bound.

Each output is one FMA chain, bias first, then the inputs in order: a row's values do not depend on the other rows,
the batch or the thread count. The results are not addmm's bits (another summation order), within float32 rounding
of them (tests/models/test_linear.py bounds the error by the dot products' rounding bound).

Only eager calls on float32 CPU tensors without gradients take the kernel (kernels._backends.eager_cpu): tracing,
torch.compile, export and training see F.linear. As for conv.Conv2d, the blocked weight is a copy (the weight's size
again, rounded up to 16 output features, while the layer lives), made on the first such call and again whenever
the weight was replaced, moved or written in place; a write through `weight.data` is not seen, and inference-mode
weights keep F.linear. The copy is never pickled or deep-copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels._backends import cpu_kernel, eager_cpu, profiled
from ..kernels._library import call_cpu
from .conv import direct_isa, direct_kernel, made_from, weight_entry

# The kernel for layers of at most this many input features (module docstring: faster at 96-512 inputs in every
# model shape measured; at 1152 faster too but with 9x MKL's error, at 4608 no faster)
DIRECT_MAX_IN_FEATURES = 512


class DirectLinear:
    """The blocked copy of one weight [out, in] and the blitzdiff._C.Conv2dNhwc reading it (a weak reference to the
    weight, its address and version counter when blocked, (blocked weight, kernel)), for the layer that holds it;
    `__call__` runs F.linear's math by the kernel where it applies."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry: tuple | None = None

    def __deepcopy__(self, memo: dict) -> DirectLinear:
        return DirectLinear()

    def __reduce__(self):
        return DirectLinear, ()

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """F.linear(x, weight, bias) [..., in] -> [..., out] by the kernel, or None where it does not apply
        (`applies`; the caller runs F.linear)."""
        if not applies(x, weight, bias):
            return None
        kernel = self._kernel(weight)
        if kernel is None:
            return None
        rows = x.numel() // x.shape[-1]
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32, device="cpu")
        with profiled("linear_direct"):  # a range profiles list as they list ops
            # rows as one image row of 1x1 pixels: [1, 1, rows, in] -> [1, 1, rows, out]
            call_cpu(kernel[1].run, out.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), 1, 1, rows,
                     torch.get_num_threads(), keep=(out, x, bias, *kernel))
        return out

    def _kernel(self, weight: Tensor) -> tuple[Tensor, object] | None:
        """(blocked weight, Conv2dNhwc), made again when the weight changed; None for an inference-mode weight or
        without blitzdiff._C."""
        entry = self.entry
        if not made_from(entry, weight):
            factory = cpu_kernel("Conv2dNhwc")
            if factory is None:
                return None
            # [out, in] as a 1x1 convolution's weight [out, in, 1, 1], stride 1, no padding
            entry = self.entry = weight_entry(  # one assignment: a concurrent call sees the old entry or the new
                weight, lambda w: direct_kernel(factory, w[:, :, None, None], (1, 1), (0, 0)))
        return entry[3]


def applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernel runs F.linear(x, weight, bias): an eager CPU call (eager_cpu) outside CPU autocast (where
    F.linear runs in bfloat16 and returns it) on contiguous float32 x with at least one row, a 2-D float32 CPU weight
    of at most DIRECT_MAX_IN_FEATURES inputs matching x's last dimension, a contiguous float32 CPU bias or none, no
    gradient to record, on a CPU where the kernel's AVX-512 loop runs (the one measured). Anything else is
    F.linear's to run, or to refuse with its own error (mismatched shapes or devices)."""
    if not (x.dtype == weight.dtype == torch.float32 and weight.dim() == 2 and x.dim() >= 1 and weight.is_cpu
            and eager_cpu(x) and not torch.is_autocast_enabled("cpu")):
        return False
    if not (0 < weight.shape[1] <= DIRECT_MAX_IN_FEATURES and x.shape[-1] == weight.shape[1] and x.numel() > 0):
        return False
    if bias is not None and not (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]
                                 and bias.is_contiguous() and bias.is_cpu):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return x.is_contiguous() and direct_isa() == "avx512f"


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, direct: DirectLinear | None) -> Tensor:
    """F.linear(x, weight, bias), by the kernel where `direct` is given and applies."""
    if direct is not None and (out := direct(x, weight, bias)) is not None:
        return out
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, state-dict keys and results, within float rounding) whose eager CPU float32
    calls on the "auto" backend with at most DIRECT_MAX_IN_FEATURES inputs run blitzdiff's kernel (module
    docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = "ref"
        self.direct = DirectLinear()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        return linear(x, self.weight, self.bias, self.direct if self.backend == "auto" else None)
