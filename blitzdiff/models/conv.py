"""The models' 2-D convolution: nn.Conv2d whose eager CPU calls run oneDNN with the weight reordered once.

PyTorch (2.13) runs a float32 CPU convolution through oneDNN for a batch above 1 or a batch-1 input of more than
20480 elements (`use_mkldnn` in aten/src/ATen/native/Convolution.cpp), and through its own im2col + GEMM below
that. On the oneDNN path it reorders the weight into oneDNN's blocked layout on every call. Reordered once
(`torch.ops.mkldnn._reorder_convolution_weight`, then `torch.ops.mkldnn._convolution_pointwise` per call: what
inductor's freezing pass emits for a frozen weight), the same oneDNN convolution skips that copy, which in a forward
reads a weight gone cold in the cache. Measured on a Sapphire Rapids Xeon, 2 threads, DPM-Solver++(2M) 10 steps,
two checkouts alternating in fresh processes (benchmarks/results/cpu_conv_prepack/): unet-digits at batch 8 took
0.895x the time, a 6.5 M-parameter 32x32 UNet2D at batch 1 0.909x (README "CPU: the default path"). Where PyTorch
takes its own path (batch 1, small inputs) its call stays (see `prepack_pays`).

Only eager calls on plain float32 CPU tensors without gradients take it (kernels._backends.eager_cpu): tracing,
torch.compile, export and training see the plain nn.Conv2d. The reordered weight is a copy (the weight's size
again, while the module lives); it is made on the first such call and again whenever the weight was replaced,
moved or written in place (another tensor, or its address or version counter changed: `load_state_dict`,
`pipe.load_weights`, optimizer steps, `.to()`). A write through `weight.data`, which hides from the version
counter, is not seen. Inference-mode weights have no version counter, so they keep PyTorch's call. The copy is never
pickled or deep-copied.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn

from ..kernels._backends import eager_cpu

# PyTorch's own threshold: a batch-1 input with more elements runs oneDNN there too (use_mkldnn, see above)
ONEDNN_MIN_INPUT = 20480


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN (x86 and ARM wheels do)."""
    return torch.backends.mkldnn.is_available()


def prepack_pays(shape: torch.Size) -> bool:
    """Whether a convolution of an input of `shape` [B, C, H, W] runs faster prepacked than by PyTorch's own call:
    where PyTorch runs oneDNN too (with 2 or more threads: a batch above 1, or a batch-1 input above
    ONEDNN_MIN_INPUT elements), whose per-call weight reorder it saves. Below that, PyTorch's im2col path won in the
    network: unet-digits' batch-1 forward ran 1.05-1.13x slower with its larger convolutions there prepacked too
    (from 2-6 M multiply-adds), although the same convolutions replayed alone had run faster prepacked."""
    batch, channels, height, width = shape
    return batch > 1 or channels * height * width > ONEDNN_MIN_INPUT


class PrepackedWeight:
    """A Conv2d's prepacking state: `plan` = (input shape, whether prepacking pays for it: `prepack_pays` and the
    module's own settings), `entry` = (a weak reference to the weight it was made from, that weight's address and
    version counter then, the weight in oneDNN's layout). The weight itself is compared too, not only its address: a
    replaced parameter may be given a freed one's memory. An opaque oneDNN tensor has no storage to copy or pickle,
    so copies of the module start without either."""

    __slots__ = ("plan", "entry")

    def __init__(self):
        self.plan: tuple[torch.Size, bool] | None = None
        self.entry: tuple[weakref.ref, int, int, Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> PrepackedWeight:
        return PrepackedWeight()

    def __reduce__(self):
        return PrepackedWeight, ()


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters, state-dict keys and results, within float rounding) whose eager CPU float32
    calls on the "auto" backend run oneDNN with the weight reordered once, where `prepack_pays` (module docstring).
    What does not depend on the call's tensors is decided once per input shape, so a call that PyTorch runs costs
    a shape comparison (about 0.2 us) more than nn.Conv2d's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = "ref"
        self.prepacked = PrepackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C_out, H_out, W_out]."""
        if self.backend == "auto":
            plan = self.prepacked.plan
            if plan is None or plan[0] != x.shape:  # a new shape: decided in eager calls only (not under compile)
                if not eager_cpu(x):
                    return self._conv_forward(x, self.weight, self.bias)
                plan = self.prepacked.plan = (x.shape, self._pays(x))
            if plan[1] and eager_cpu(x) and (out := self._prepacked_conv(x)) is not None:
                return out
        return self._conv_forward(x, self.weight, self.bias)

    def _pays(self, x: Tensor) -> bool:
        """Whether calls on inputs of x's shape take the prepacked path (when their tensors allow it): 4-D, zeros
        padding given as numbers, a torch with oneDNN, and `prepack_pays`."""
        return (x.dim() == 4 and self.weight.dim() == 4 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and onednn_available() and prepack_pays(x.shape))

    def _prepacked_conv(self, x: Tensor) -> Tensor | None:
        """The convolution of the eager CPU tensor x by oneDNN with the prepacked weight, or None where PyTorch's
        call runs: not float32, gradients, inference-mode weights, or a layout whose output PyTorch would give
        contiguous (the prepacked call returns channels-last, as PyTorch does when x or the weight is)."""
        weight, bias = self.weight, self.bias
        if (x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.is_inference()
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (bias is not None and bias.requires_grad)))
                or not (x.is_contiguous(memory_format=torch.channels_last)
                        or weight.is_contiguous(memory_format=torch.channels_last))):
            return None
        entry = self.prepacked.entry
        if (entry is None or entry[0]() is not weight or entry[1] != weight.data_ptr()
                or entry[2] != weight._version):
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            # one assignment: a concurrent call sees the old entry or the new one whole
            entry = self.prepacked.entry = (weakref.ref(weight), weight.data_ptr(), weight._version, packed)
        return torch.ops.mkldnn._convolution_pointwise(x, entry[3], bias, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, "none", [], "")
