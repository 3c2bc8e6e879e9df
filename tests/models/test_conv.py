"""The models' Conv2d (models.conv): in eager CPU inference on "auto", blitzdiff's Winograd kernels for 3x3
convolutions with enough channels and tiles, its direct NHWC kernel where PyTorch runs its im2col path or the
convolution is small (on AVX-512 CPUs: the tests make every CPU count as one, the kernels' portable loops then run),
oneDNN with the weight prepacked once for the other large ones, PyTorch's own convolution everywhere else, and never
a stale weight.

The reference is F.conv2d in float64 on the same weights; the prepacked result must be as close to it as PyTorch's
own float32 convolution is (within 2x its error), the native ones within their kernels' error budgets (ERROR_FACTOR).
Which path ran is read from the profiler (`mkldnn::_convolution_pointwise` for oneDNN, `aten::convolution` for
PyTorch's call, the range `blitzdiff::conv2d_<path>` for a native kernel), so a test of a path cannot pass by running
another.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import blitzdiff
from blitzdiff.models import conv as conv_module
from blitzdiff.models import set_backend
from blitzdiff.models.conv import Conv2d, direct_pays, onednn_available, prepack_pays

from .dispatch import OpRecorder

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

PREPACKED_OP = "mkldnn::_convolution_pointwise"
TORCH_OP = "aten::convolution"
RANGES = {"onednn": PREPACKED_OP, "torch": TORCH_OP, **{path: f"blitzdiff::conv2d_{path}"
                                                        for path in ("direct", "winograd", "winograd4")}}
ERROR_FACTOR = {"onednn": 2, "direct": 8, "winograd": 4, "winograd4": 64}  # tests/kernels/test_conv2d_winograd.py
# an input shape per packed path (its channels the convolution's), for the tests that hold for all of them: 8 input
# channels keep the 3x3 convolutions off the Winograd kernel (WINOGRAD_MIN_IN_CHANNELS), 16 put them on it, F(4x4)
# from 256 output pixels (WINOGRAD4_MIN_PIXELS)
PATH_INPUTS = {"onednn": (2, 8, 96, 96), "direct": (1, 8, 6, 6), "winograd": (1, 16, 8, 8),
               "winograd4": (1, 16, 16, 16)}
PATHS = list(PATH_INPUTS)


@pytest.fixture(autouse=True)
def direct_kernel_everywhere(monkeypatch):
    """direct_pays as on an AVX-512 CPU, so the direct path runs on any CI machine (its portable loop elsewhere)."""
    monkeypatch.setattr(conv_module, "direct_isa", lambda: "avx512f")


def make_conv(cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 1, bias: bool = True,
              channels_last: bool = True) -> Conv2d:
    torch.manual_seed(cin * 100 + cout)
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
    conv.backend = "auto"
    return conv.to(memory_format=torch.channels_last) if channels_last else conv


def channels_last_input(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)


def reference(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, conv.stride, conv.padding)


def ran_path(conv: Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """conv(x) and the path it took, as the profiler shows it: "onednn", "torch", or the native kernel whose range
    `blitzdiff::conv2d_<path>` shows ("direct", "winograd" or "winograd4"); exactly one of them."""
    with torch.profiler.profile() as prof:
        out = conv(x)
    names = {event.name for event in prof.events()}
    ran = [path for path, name in RANGES.items() if name in names]
    assert len(ran) == 1, names
    return out, ran[0]


def path_case(path: str, out_channels: int = 16, **kwargs) -> tuple[Conv2d, torch.Tensor]:
    """A 3x3 convolution and a channels-last input that take `path` (PATH_INPUTS)."""
    shape = PATH_INPUTS[path]
    return make_conv(shape[1], out_channels, 3, **kwargs), channels_last_input(*shape)


def assert_as_close_as_torch(out: torch.Tensor, conv: Conv2d, x: torch.Tensor, factor: float = 2) -> None:
    exact = reference(conv, x)
    torch_error = (conv._conv_forward(x, conv.weight, conv.bias).double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= factor * torch_error + 1e-6, (error, torch_error)


def packed_and_accurate(conv: Conv2d, x: torch.Tensor, path: str) -> torch.Tensor:
    """conv(x) in inference mode, which must run `path` and be as close as PyTorch's own (within its factor)."""
    with torch.inference_mode():
        out, ran = ran_path(conv, x)
    assert ran == path
    assert_as_close_as_torch(out, conv, x, ERROR_FACTOR[path])
    assert out.is_contiguous(memory_format=torch.channels_last)  # as PyTorch's own call returns it
    return out


CASES = [  # (cin, cout, kernel, stride, padding, bias, input shape): inputs where prepacking pays, above
    # DIRECT_MAX_MACS multiply-adds (with the output channels rounded up to 16)
    (8, 64, 3, 1, 1, True, (2, 8, 49, 41)),     # batch > 1, odd sizes (8 input channels: not Winograd's)
    (8, 48, 3, 1, 1, True, (1, 8, 64, 48)),     # batch 1 above PyTorch's oneDNN threshold (24576 elements)
    (96, 32, 1, 1, 0, True, (1, 96, 64, 64)),   # 1x1
    (16, 16, 3, 2, 1, False, (4, 16, 64, 63)),  # stride 2, no bias
    (3, 8, 3, 2, 0, True, (8, 3, 129, 129)),    # Downsample2D's padding 0 (after its own F.pad)
]


DIRECT_CASES = [  # batch-1 inputs of at most ONEDNN_MIN_INPUT elements (PyTorch's im2col path), and any input
    # of a convolution of at most DIRECT_MAX_MACS multiply-adds
    (32, 32, 3, 1, 1, True, (1, 32, 6, 6)),     # 9 output tiles: under WINOGRAD_MIN_TILES
    (1, 32, 3, 1, 1, True, (1, 1, 16, 16)),     # unet-digits' conv_in: 1 input channel
    (64, 64, 3, 2, 1, False, (1, 64, 8, 8)),    # Downsample2D, no bias
    (96, 64, 1, 1, 0, True, (1, 96, 8, 8)),     # 1x1 shortcut
    (5, 20, 3, 1, 0, True, (1, 5, 9, 7)),       # odd sizes, no padding
    (1, 32, 3, 1, 1, True, (8, 1, 16, 16)),     # unet-digits' conv_in at batch 8
    (128, 64, 1, 1, 0, True, (8, 128, 8, 8)),   # a 1x1 shortcut at batch 8
    (32, 32, 3, 2, 1, True, (8, 32, 16, 16)),   # a Downsample2D at batch 8
]


WINOGRAD_CASES = [  # 3x3, stride 1, >= 16 input channels and >= 16 output tiles, any batch; F(4x4) from 256 pixels
    (32, 32, 3, 1, 1, True, (1, 32, 16, 16), "winograd4"),   # unet-digits' 16x16 convolutions
    (32, 1, 3, 1, 1, True, (1, 32, 16, 16), "winograd4"),    # and its conv_out
    (96, 32, 3, 1, 1, True, (1, 96, 16, 16), "winograd4"),   # batch 1 above PyTorch's oneDNN threshold
    (64, 64, 3, 1, 1, True, (1, 64, 8, 8), "winograd"),      # its 8x8 ones
    (32, 64, 3, 1, 1, True, (2, 32, 9, 7), "winograd"),      # batch > 1, odd sizes
    (16, 24, 3, 1, 0, False, (3, 16, 11, 12), "winograd4"),  # no padding, no bias, partial 4x4 tiles
]


@pytest.mark.parametrize("case", CASES)
def test_prepacked_matches_float64_conv_as_closely_as_torch(case):
    cin, cout, kernel, stride, padding, bias, shape = case
    conv, x = make_conv(cin, cout, kernel, stride=stride, padding=padding, bias=bias), channels_last_input(*shape)
    assert prepack_pays(x.shape)
    out = packed_and_accurate(conv, x, "onednn")
    assert out.shape == conv._conv_forward(x, conv.weight, conv.bias).shape


@pytest.mark.parametrize("case", DIRECT_CASES)
def test_direct_matches_float64_conv_within_budget(case):
    cin, cout, kernel, stride, padding, bias, shape = case
    conv, x = make_conv(cin, cout, kernel, stride=stride, padding=padding, bias=bias), channels_last_input(*shape)
    out = packed_and_accurate(conv, x, "direct")
    assert out.shape == conv._conv_forward(x, conv.weight, conv.bias).shape


@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_matches_float64_conv_within_budget(case):
    cin, cout, kernel, stride, padding, bias, shape, path = case
    conv, x = make_conv(cin, cout, kernel, stride=stride, padding=padding, bias=bias), channels_last_input(*shape)
    out = packed_and_accurate(conv, x, path)
    assert out.shape == conv._conv_forward(x, conv.weight, conv.bias).shape


def test_winograd_thresholds_decide_the_path():
    """One input channel or tile fewer than the thresholds, and the same convolution runs the direct kernel; a pixel
    fewer than F(4x4)'s, and it runs F(2x2)."""
    for cin, shape, path in [(16, (1, 16, 8, 8), "winograd"), (15, (1, 15, 8, 8), "direct"),
                             (16, (1, 16, 7, 8), "winograd"), (16, (1, 16, 6, 8), "direct"),
                             (16, (1, 16, 16, 16), "winograd4"), (16, (1, 16, 15, 16), "winograd"),
                             (15, (16, 15, 16, 16), "onednn")]:
        conv, x = make_conv(cin, 16, 3), channels_last_input(*shape)
        packed_and_accurate(conv, x, path)
    assert (conv_module.WINOGRAD_MIN_IN_CHANNELS, conv_module.WINOGRAD_MIN_TILES,
            conv_module.WINOGRAD4_MIN_PIXELS) == (16, 16, 256)


def test_direct_threshold_decides_the_path():
    """A convolution of DIRECT_MAX_MACS multiply-adds runs the direct kernel at batch 2, one of a row more runs
    oneDNN; the output channels count rounded up to 16 (a 1x1 one of 49 output channels, 64 as computed)."""
    for cout, shape, path in [(64, (2, 64, 32, 32), "direct"), (64, (2, 64, 33, 32), "onednn"),
                              (49, (2, 64, 33, 32), "onednn"), (48, (2, 64, 33, 32), "direct")]:
        conv, x = make_conv(64, cout, 1, padding=0), channels_last_input(*shape)
        packed_and_accurate(conv, x, path)
    assert conv_module.DIRECT_MAX_MACS == 2 * 32 * 32 * 64 * 64


def test_shapes_taking_different_paths_keep_one_packed_weight_each():
    """A model sampled at batch 1 and 8 in turn: a few-tile input runs direct, a larger one Winograd, and neither
    path's packed weight is made again when the other runs."""
    conv, small, large = make_conv(16, 16, 3), channels_last_input(1, 16, 4, 4), channels_last_input(8, 16, 4, 4)
    packed_and_accurate(conv, small, "direct")
    packed_and_accurate(conv, large, "winograd")
    entries = (conv.prepacked.direct, conv.prepacked.winograd)
    packed_and_accurate(conv, small, "direct")
    packed_and_accurate(conv, large, "winograd")
    assert (conv.prepacked.direct, conv.prepacked.winograd) == entries and all(e is not None for e in entries)


def test_small_batch_one_inputs_keep_torchs_call_without_avx512(monkeypatch):
    monkeypatch.setattr(conv_module, "direct_isa", lambda: "generic")  # the only loop measured is AVX-512's
    conv, x = make_conv(32, 32, 3), channels_last_input(1, 32, 16, 16)
    assert not direct_pays(x.shape, 0)
    with torch.inference_mode():
        out, path = ran_path(conv, x)
    assert path == "torch"
    torch.testing.assert_close(out.double(), reference(conv, x), rtol=1e-5, atol=1e-5)


def test_grouped_and_dilated_convolutions_keep_torchs_call():
    x = channels_last_input(1, 8, 6, 6)
    for conv in (Conv2d(8, 8, 3, padding=1, groups=2), Conv2d(8, 8, 3, padding=2, dilation=2)):
        conv.backend = "auto"
        conv = conv.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            out, path = ran_path(conv, x)
        assert path == "torch"
        torch.testing.assert_close(out.double(), reference_of(conv, x), rtol=1e-5, atol=1e-5)


def reference_of(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding, conv.dilation,
                    conv.groups)


@pytest.mark.parametrize("path", PATHS)
def test_torchs_call_wherever_the_packed_ones_do_not_apply(path):
    conv, x = path_case(path, 8)
    with torch.inference_mode():
        assert ran_path(conv, x)[1] == path
    conv.backend = "ref"
    with torch.inference_mode():
        assert ran_path(conv, x)[1] == "torch"  # another backend
    conv.backend = "auto"
    assert ran_path(conv, x.requires_grad_())[1] == "torch"  # gradients: autograd must see PyTorch's op
    x = x.detach()
    as64 = copy.deepcopy(conv).double()
    with torch.inference_mode():
        out, ran = ran_path(as64, x.double())  # float64
    assert ran == "torch"
    torch.testing.assert_close(out, reference(as64, x))
    contiguous = path_case(path, 8, channels_last=False)[0]
    with torch.inference_mode():
        out, ran = ran_path(contiguous, x.contiguous())  # PyTorch returns NCHW here; so must we
    assert ran == "torch" and out.is_contiguous()
    with torch.inference_mode():
        out, ran = ran_path(conv, x.contiguous())  # NCHW x, channels-last weight: PyTorch returns channels-last
    assert ran == ("onednn" if path == "onednn" else "torch")  # the native kernels read only dense NHWC
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", PATHS)
def test_autocast_keeps_torchs_call(path):
    """Under CPU autocast PyTorch's convolution runs in bfloat16 and returns it; the packed paths would not."""
    conv, x = path_case(path, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ran = ran_path(conv, x)
    assert ran == "torch" and out.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_dispatch_modes_and_tracing_see_torchs_call():
    for path in PATHS:
        conv, x = path_case(path, 8)
        with torch.inference_mode(), OpRecorder() as recorder:
            conv(x)
        assert "aten.conv2d.default" in recorder.ops
        assert not any("_convolution_pointwise" in op for op in recorder.ops)
        assert all(getattr(conv.prepacked, path) is None for path in PATHS)
        with torch.no_grad():
            graph = str(torch.jit.trace(conv, x).graph)  # records only the ops it sees: they must be PyTorch's own
        assert "aten::_convolution" in graph and "_convolution_pointwise" not in graph


@pytest.mark.parametrize("path", PATHS)
def test_weights_written_in_place_are_repacked(path):
    conv, x = path_case(path)
    with torch.inference_mode():
        before = conv(x)
    state = {name: value * 2 for name, value in conv.state_dict().items()}
    conv.load_state_dict(state)  # copies in place: same address, new version
    with torch.inference_mode():
        after, ran = ran_path(conv, x)
    assert ran == path
    torch.testing.assert_close(after, before * 2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.weight.zero_()
    with torch.inference_mode():
        assert ran_path(conv, x)[0].sub(conv.bias[:, None, None]).abs().max().item() == 0
    with torch.no_grad():
        conv.bias.copy_(torch.arange(16.0))  # the bias is read per call, never packed
    with torch.inference_mode():
        assert torch.equal(ran_path(conv, x)[0], torch.arange(16.0)[:, None, None].expand_as(before))


@pytest.mark.parametrize("path", PATHS)
def test_a_replaced_weight_is_repacked_even_at_the_old_address_and_version(path):
    """An allocator may give a new parameter a freed one's memory, and both start at version 0: the packing must
    compare the tensor itself. Here the new parameter shares the old one's memory (from_numpy: a fresh version
    counter) and its values are written through NumPy, which no version counter sees."""
    conv, x = path_case(path)
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone(memory_format=torch.channels_last))  # version 0
    with torch.inference_mode():
        conv(x)
    shared = torch.from_numpy(conv.weight.detach().numpy())  # same address, strides and version (0)
    assert (shared.data_ptr(), shared._version) == (conv.weight.data_ptr(), conv.weight._version)
    shared.numpy()[:] *= -1
    conv.weight = torch.nn.Parameter(shared)
    packed_and_accurate(conv, x, path)


@pytest.mark.parametrize("path", PATHS)
def test_moved_weights_are_repacked(path):
    conv, x = path_case(path)
    with torch.inference_mode():
        conv(x)
    conv.double().float()  # new float32 parameters at new addresses
    with torch.no_grad():
        conv.weight.mul_(-1)
    packed_and_accurate(conv, x, path)


@pytest.mark.parametrize("path", PATHS)
def test_copies_and_pickles_of_a_packed_conv_work(path):
    conv, x = path_case(path)
    with torch.inference_mode():
        expected = conv(x)
    assert getattr(conv.prepacked, path) is not None  # an opaque oneDNN tensor or a C++ object: no copy, no pickle
    for twin in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert all(getattr(twin.prepacked, other) is None for other in PATHS)
        with torch.inference_mode():
            out, ran = ran_path(twin, x)
        assert ran == path
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_inference_mode_weights_keep_torchs_call(path):
    with torch.inference_mode():
        conv, x = path_case(path)  # no version counter to watch
        out, ran = ran_path(conv, x)
    assert ran == "torch"
    torch.testing.assert_close(out.double(), reference(conv, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [4, 1])
def test_loaded_models_run_native_convolutions_and_sample_as_torch_does(n):
    """unet-digits at batch 4 and 1: its 3x3 convolutions with enough input channels and tiles run the Winograd
    kernel, every other one (1x1, strided, the 1-channel conv_in: all under DIRECT_MAX_MACS) the direct kernel;
    neither PyTorch's convolution nor oneDNN runs."""
    pipe = blitzdiff.load("unet-digits")
    kwargs = dict(n=n, steps=3, seeds=0, output_type="raw")
    with torch.profiler.profile() as prof:
        packed = pipe.sample(**kwargs)
    ran = {path for path, name in RANGES.items() if name in {event.name for event in prof.events()}}
    assert ran == {"direct", "winograd", "winograd4"} if n == 4 else ran >= {"direct", "winograd"}
    set_backend(pipe.model, "ref")  # PyTorch's convolutions (and the kernel specs)
    plain = pipe.sample(**kwargs)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_a_changed_default_dtype_or_device_changes_nothing(path):
    """The direct path allocates its output itself: float32 on the CPU whatever torch's defaults say."""
    conv, x = path_case(path)
    with torch.inference_mode():
        expected = conv(x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode(), torch.device("meta"):
            out, ran = ran_path(conv, x)
    finally:
        torch.set_default_dtype(previous)
    assert ran == path and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_an_input_smaller_than_the_kernel_gets_torchs_own_error():
    conv = Conv2d(4, 8, 3)  # no padding
    conv.backend = "auto"
    conv = conv.to(memory_format=torch.channels_last)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input"):
        conv(channels_last_input(1, 4, 2, 2))
