"""The models' 2-D convolution: nn.Conv2d whose eager CPU calls run blitzdiff's Winograd kernel for 3x3 convolutions,
its direct NHWC kernel for small ones, or oneDNN with the weight reordered once.

PyTorch (2.13) runs a float32 CPU convolution through oneDNN for a batch above 1 or a batch-1 input of more than
20480 elements (`use_mkldnn` in aten/src/ATen/native/Convolution.cpp), and through its own im2col + GEMM below
that. On the oneDNN path it reorders the weight into oneDNN's blocked layout on every call. Reordered once
(`torch.ops.mkldnn._reorder_convolution_weight`, then `torch.ops.mkldnn._convolution_pointwise` per call: what
inductor's freezing pass emits for a frozen weight), the same oneDNN convolution skips that copy, which in a forward
reads a weight gone cold in the cache. Measured on a Sapphire Rapids Xeon, 2 threads, DPM-Solver++(2M) 10 steps,
two checkouts alternating in fresh processes (benchmarks/results/cpu_conv_prepack/): unet-digits at batch 8 took
0.895x the time, a 6.5 M-parameter 32x32 UNet2D at batch 1 0.909x (README "CPU: the default path").

Where PyTorch takes its own im2col path, and for any convolution of at most DIRECT_MAX_MACS multiply-adds
(`direct_pays`), blitzdiff._C.Conv2dNhwc (csrc/conv2d_cpu.cpp) runs the convolution on the NHWC activations directly,
from a weight blocked once by `pack_direct`: no im2col buffer, and about 1.4 us of fixed cost a call where PyTorch's
im2col path costs 15-20 us even on a 4x4 input and prepacked oneDNN tens of us more than the kernel at batch-8
sizes (unet-digits' 1x1, strided and 1-channel convolutions).

3x3, stride-1 convolutions with at least WINOGRAD_MIN_IN_CHANNELS input channels and WINOGRAD_MIN_TILES output
tiles (2x2 pixels each, over the batch) run blitzdiff._C.Conv2dWinograd (csrc/conv2d_winograd_cpu.cpp), at any
batch, from a weight transformed once by `pack_winograd`: Winograd F(4x4, 3x3) from WINOGRAD4_MIN_PIXELS output
pixels (4x fewer multiply-adds than a direct or oneDNN convolution, its largest error 10-43x PyTorch's measured,
relative ~1e-5), F(2x2, 3x3) below (2.25x fewer, errors at PyTorch's level); within the componentwise Winograd
error bound (tests/kernels/test_conv2d_winograd.py), not F.conv2d's bits. Replayed alone, F(2x2) beat the other paths
at every such shape measured (1.1-2.0x, AMD EPYC Zen 4, 2 threads; benchmarks/kernels/bench_winograd.py) and F(4x4)
beat F(2x2) by 1.5-1.65x; in a network, where the transformed weights (16/9x and 4x the weight) are read cold, a
convolution over fewer than 16 tiles did not pay, nor F(4x4) on unet-digits' 8x8 level at batch 1, hence the
thresholds (README "Winograd convolutions").

Both native kernels run only on CPUs where their AVX-512 loop runs (`direct_isa`), the one measured.

A native kernel's call shows in torch's profiler as a range `blitzdiff::conv2d_<path>` (direct, winograd, winograd4),
as a oneDNN call shows as `mkldnn::_convolution_pointwise` and PyTorch's as `aten::convolution`.

Only eager calls on plain float32 CPU tensors without gradients take either path (kernels._backends.eager_cpu):
tracing, torch.compile, export and training see the plain nn.Conv2d. The packed weight is a copy (the weight's size
again, while the module lives); it is made on the first such call and again whenever the weight was replaced,
moved or written in place (another tensor, or its address or version counter changed: `load_state_dict`,
`pipe.load_weights`, optimizer steps, `.to()`). A write through `weight.data`, which hides from the version
counter, is not seen. Inference-mode weights have no version counter, so they keep PyTorch's call. The copy is never
pickled or deep-copied; the bias is read at every call, never copied.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn

from ..kernels._backends import cpu_kernel, eager_cpu, profiled
from ..kernels._library import call_cpu

# PyTorch's own threshold: a batch-1 input with more elements runs oneDNN there too (use_mkldnn, see above)
ONEDNN_MIN_INPUT = 20480
DIRECT_LANES = 16  # output channels per block of the native kernels' packed weights (csrc/conv2d.h)
# The direct kernel up to this many multiply-adds at any batch: prepacked oneDNN costs tens of us a call more there
# (2 threads, AMD EPYC, unet-digits at batch 8: 1x1 convolutions 19-68 us against 43-117, the 1-channel conv_in 20
# against 49; benchmarks/kernels/bench_conv2d_nhwc.py --batch 8), and won or tied above in a one-off replay (1x1
# ones of 100-270 M 0-11% faster, a stride-2 3x3 one of 9.4 M 2x faster)
DIRECT_MAX_MACS = 2**23
# Winograd F(2x2, 3x3): fewer input channels leave its transforms costing more than the multiply-adds they save
# (with 1-4 input channels it took 1.2-2x the direct kernel's time, with 16 0.75x: benchmarks/kernels/bench_winograd.py)
WINOGRAD_MIN_IN_CHANNELS = 16
WINOGRAD_MIN_TILES = 16
# F(4x4, 3x3) from this many output pixels (over the batch) up; F(2x2, 3x3) below
WINOGRAD4_MIN_PIXELS = 256
# G of F(m x m, 3x3) per output tile size m: the weight's transform U = G g G^T (csrc/conv2d_winograd.h)
WINOGRAD_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN (x86 and ARM wheels do)."""
    return torch.backends.mkldnn.is_available()


def direct_pays(shape: torch.Size, macs: int) -> bool:
    """Whether a convolution of an input of `shape` and `macs` multiply-adds (with the output channels rounded up to
    DIRECT_LANES, as the kernel computes them) runs faster by blitzdiff's direct NHWC kernel (blitzdiff._C.Conv2dNhwc,
    csrc/conv2d_cpu.cpp) than by PyTorch's own call or prepacked oneDNN: where PyTorch takes its im2col path (not
    `prepack_pays`), or at any size up to DIRECT_MAX_MACS, on a CPU where the kernel's AVX-512 loop runs, the only
    one it was measured on (module docstring)."""
    return (not prepack_pays(shape) or macs <= DIRECT_MAX_MACS) and direct_isa() == "avx512f"


@functools.cache
def direct_isa() -> str | None:
    """The loop blitzdiff._C.Conv2dNhwc runs on this CPU ("avx512f" or "generic"), None without blitzdiff._C."""
    isa = cpu_kernel("conv2d_nhwc_isa")
    return None if isa is None else isa()


def prepack_pays(shape: torch.Size) -> bool:
    """Whether a convolution of an input of `shape` [B, C, H, W] runs faster prepacked than by PyTorch's own call:
    where PyTorch runs oneDNN too (with 2 or more threads: a batch above 1, or a batch-1 input above
    ONEDNN_MIN_INPUT elements), whose per-call weight reorder it saves. Below that, PyTorch's im2col path won in the
    network: unet-digits' batch-1 forward ran 1.05-1.13x slower with its larger convolutions there prepacked too
    (from 2-6 M multiply-adds), although the same convolutions replayed alone had run faster prepacked."""
    batch, channels, height, width = shape
    return batch > 1 or channels * height * width > ONEDNN_MIN_INPUT


class PrepackedWeight:
    """A Conv2d's packing state: `plan` = (input shape, the path calls of that shape take when their tensors allow
    it: "onednn", "winograd4", "winograd", "direct" or None for PyTorch's own call), and per path an entry (a weak
    reference to the weight it was made from, that weight's address and version counter then, what was made from it:
    for "onednn" the weight in oneDNN's layout, for the native paths the packed weight and the blitzdiff._C kernel
    reading it; one per path, so calls of shapes that take different paths do not repack in turn). The weight itself
    is compared too, not only its address: a replaced parameter may be given a freed one's memory. Neither an opaque
    oneDNN tensor nor a C++ object can be copied or pickled, so copies of the module start without them."""

    __slots__ = ("plan", "onednn", "direct", "winograd", "winograd4")

    def __init__(self):
        self.plan: tuple[torch.Size, str | None] | None = None
        self.onednn: tuple[weakref.ref, int, int, Tensor] | None = None
        self.direct: tuple[weakref.ref, int, int, tuple[Tensor, object]] | None = None
        self.winograd: tuple[weakref.ref, int, int, tuple[Tensor, object]] | None = None
        self.winograd4: tuple[weakref.ref, int, int, tuple[Tensor, object]] | None = None

    def __deepcopy__(self, memo: dict) -> PrepackedWeight:
        return PrepackedWeight()

    def __reduce__(self):
        return PrepackedWeight, ()


def made_from(entry: tuple | None, weight: Tensor) -> bool:
    """Whether a packed-weight entry (a PrepackedWeight's, a linear.DirectLinear's) was made from `weight` as it is
    now (same tensor, address and version; an inference tensor, which has no version counter and stays one, is
    entered with version None and nothing made)."""
    return (entry is not None and entry[0]() is weight and entry[1] == weight.data_ptr()
            and (entry[2] is None or entry[2] == weight._version))


def weight_entry(weight: Tensor, make) -> tuple:
    """A packed-weight entry for `weight` (made_from): make(weight) for a float32 weight that is no inference tensor,
    else None (PyTorch's call runs)."""
    if weight.is_inference():
        return weakref.ref(weight), weight.data_ptr(), None, None
    return weakref.ref(weight), weight.data_ptr(), weight._version, (
        make(weight) if weight.dtype == torch.float32 else None)


def _lane_padded(weight: Tensor) -> Tensor:
    """[O, ...] -> [ceil(O / 16) * 16, ...], zero past O."""
    blocks = -(-weight.shape[0] // DIRECT_LANES)
    return torch.nn.functional.pad(weight, (0, 0) * (weight.dim() - 1) + (0, blocks * DIRECT_LANES - weight.shape[0]))


def pack_direct(weight: Tensor) -> Tensor:
    """[O, C, KH, KW] -> blitzdiff._C.Conv2dNhwc's blocked weight [ceil(O / 16), KH, KW, C, 16], zero past O."""
    _, in_channels, kernel_h, kernel_w = weight.shape
    padded = _lane_padded(weight.detach())
    return padded.reshape(-1, DIRECT_LANES, in_channels, kernel_h, kernel_w).permute(0, 3, 4, 2, 1).contiguous()


def direct_kernel(factory, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> tuple[Tensor, object]:
    """(weight [O, C, KH, KW] blocked by pack_direct, the blitzdiff._C.Conv2dNhwc made by `factory` reading it)."""
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    packed = pack_direct(weight)
    return packed, factory(in_channels, out_channels, kernel_h, kernel_w, *stride, *padding, packed.data_ptr())


def pack_winograd(weight: Tensor, tile: int = 2) -> Tensor:
    """[O, C, 3, 3] -> blitzdiff._C.Conv2dWinograd's transformed weight for output tiles of tile x tile pixels,
    [(tile + 2)^2, ceil(O / 16), C, 16]: U = G g G^T per (o, c), computed in float64 and rounded once, position
    p = (tile + 2) i + j of the transformed tile first, zero past O."""
    g = torch.tensor(WINOGRAD_G[tile], dtype=torch.float64)
    transformed = torch.einsum("ik,ockl,jl->ocij", g, weight.detach().double(), g)  # [O, C, tile + 2, tile + 2]
    padded = _lane_padded(transformed).to(weight.dtype)
    return padded.reshape(-1, DIRECT_LANES, weight.shape[1], (tile + 2) ** 2).permute(3, 0, 2, 1).contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters, state-dict keys and results, within float rounding) whose eager CPU float32
    calls on the "auto" backend run blitzdiff's Winograd kernels where `_winograd_path` names one, its direct
    convolution where `direct_pays`, and oneDNN with the weight reordered once where `prepack_pays` (module
    docstring). What does not depend on the call's tensors is decided once per input shape, so a call that PyTorch
    runs costs a shape comparison (about 0.2 us) more than nn.Conv2d's."""

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
                plan = self.prepacked.plan = self._plan(x)
            if plan[1] is not None and eager_cpu(x):
                parameters = self._parameters  # what self.weight reads, without nn.Module's __getattr__ (0.5 us)
                weight, bias = parameters["weight"], parameters["bias"]
                if self._takes(x, weight, bias, plan[1]):
                    if plan[1] == "onednn":
                        if (packed := self._onednn_weight(weight, x)) is not None:
                            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *plan[2], self.groups,
                                                                           "none", [], "")
                    elif (native := self._native_kernel(weight, plan[1])) is not None:
                        out = torch.empty(plan[2], dtype=torch.float32, device="cpu",
                                          memory_format=torch.channels_last)
                        with profiled(f"conv2d_{plan[1]}"):  # a range profiles list as they list ops
                            call_cpu(native[1].run, out.data_ptr(), x.data_ptr(),
                                     0 if bias is None else bias.data_ptr(), *plan[3], torch.get_num_threads(),
                                     keep=(out, x, bias, *native))
                        return out
        return self._conv_forward(x, self.weight, self.bias)

    def _plan(self, x: Tensor) -> tuple:
        """(x's shape, the path calls of that shape take when their tensors allow it, what the path's call needs):
        for 4-D inputs and zeros padding given as numbers, with one group and no dilation on a CPU where the native
        kernels' AVX-512 loop runs, the path `_winograd_path` names, else "direct" where `direct_pays`, each with
        the output shape and the kernel's (batch, height, width); else "onednn" where `prepack_pays` (a torch with
        oneDNN) with its padding, stride and dilation lists; else None (PyTorch's call)."""
        shape = x.shape
        if not (x.dim() == 4 and self.weight.dim() == 4 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)):
            return shape, None
        if self.groups == 1 and self.dilation == (1, 1) and direct_isa() == "avx512f":
            batch, _, height, width = shape
            out_size = [(size + 2 * pad - kernel) // stride + 1
                        for size, pad, kernel, stride in zip((height, width), self.padding, self.kernel_size,
                                                             self.stride, strict=True)]
            macs = batch * out_size[0] * out_size[1] * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * \
                -(-self.out_channels // DIRECT_LANES) * DIRECT_LANES
            native = self._winograd_path(batch, out_size) or ("direct" if direct_pays(shape, macs) else None)
            if native is not None and min(out_size) >= 1:  # else PyTorch's call says what is wrong with the sizes
                return shape, native, (batch, self.out_channels, *out_size), (batch, height, width)
        if prepack_pays(shape) and onednn_available():
            return shape, "onednn", (list(self.padding), list(self.stride), list(self.dilation))
        return shape, None

    def _winograd_path(self, batch: int, out_size: list[int]) -> str | None:
        """The blitzdiff._C.Conv2dWinograd path of this convolution, if any (a 3x3 kernel, stride 1, at least
        WINOGRAD_MIN_IN_CHANNELS input channels and WINOGRAD_MIN_TILES output tiles of 2x2; groups and dilation
        looked at by the caller): "winograd4" (F(4x4, 3x3)) from WINOGRAD4_MIN_PIXELS output pixels, else
        "winograd" (F(2x2, 3x3))."""
        if not (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.in_channels >= WINOGRAD_MIN_IN_CHANNELS):
            return None
        if batch * out_size[0] * out_size[1] >= WINOGRAD4_MIN_PIXELS:
            return "winograd4"
        return "winograd" if batch * ((out_size[0] + 1) // 2) * ((out_size[1] + 1) // 2) >= WINOGRAD_MIN_TILES else None

    @staticmethod
    def _takes(x: Tensor, weight: Tensor, bias: Tensor | None, path: str) -> bool:
        """Whether this call's tensors allow `path`: float32 x without gradients, and a layout whose result
        PyTorch's call returns channels-last too, as every path does: x or the weight channels-last, and for the
        native kernels x itself (they read it as dense NHWC). The weight itself is looked at where it is packed
        (weight_entry)."""
        if x.dtype != torch.float32 or not weight.is_cpu or torch.is_autocast_enabled("cpu") or (
                torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))):
            return False  # (CPU autocast: PyTorch's call runs and returns bfloat16; another device: its error)
        if x.is_contiguous(memory_format=torch.channels_last):
            return True
        return path == "onednn" and weight.is_contiguous(memory_format=torch.channels_last)

    def _onednn_weight(self, weight: Tensor, x: Tensor) -> Tensor | None:
        """The weight in oneDNN's layout (made again when the weight changed), or None (weight_entry)."""
        entry = self.prepacked.onednn
        if not made_from(entry, weight):
            # one assignment: a concurrent call sees the old entry or the new one whole
            entry = self.prepacked.onednn = weight_entry(
                weight, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
                    w.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)))
        return entry[3]

    def _native_kernel(self, weight: Tensor, path: str) -> tuple[Tensor, object] | None:
        """(packed weight, the blitzdiff._C kernel object of `path` reading it: "direct": Conv2dNhwc; "winograd",
        "winograd4": Conv2dWinograd of 2x2 / 4x4 tiles), made again when the weight changed, or None (weight_entry; or
        without blitzdiff._C)."""
        entry = getattr(self.prepacked, path)
        if not made_from(entry, weight):
            factory = cpu_kernel("Conv2dNhwc" if path == "direct" else "Conv2dWinograd")
            if factory is None:
                return None

            def make(w: Tensor) -> tuple[Tensor, object]:
                if path != "direct":
                    tile = 4 if path == "winograd4" else 2
                    packed = pack_winograd(w, tile)
                    return packed, factory(self.in_channels, self.out_channels, *self.padding, packed.data_ptr(),
                                           tile)
                return direct_kernel(factory, w, self.stride, self.padding)

            entry = weight_entry(weight, make)
            setattr(self.prepacked, path, entry)  # one assignment: a concurrent call sees the old entry or the new
        return entry[3]
