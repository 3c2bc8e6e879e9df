"""The models' Conv2d (models.conv): oneDNN with the weight prepacked once in eager CPU inference on "auto", PyTorch's
own convolution everywhere else, and never a stale weight.

The reference is F.conv2d in float64 on the same weights; the prepacked result must be as close to it as PyTorch's
own float32 convolution is (within 2x its error). Whether the prepacked path ran is read from the profiler
(`mkldnn::_convolution_pointwise`), so a test of it cannot pass by running PyTorch's call instead.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import blitzdiff
from blitzdiff.models import set_backend
from blitzdiff.models.conv import Conv2d, onednn_available, prepack_pays

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

PREPACKED_OP = "mkldnn::_convolution_pointwise"


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


def ran_prepacked(conv: Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    with torch.profiler.profile() as prof:
        out = conv(x)
    return out, any(event.name == PREPACKED_OP for event in prof.events())


def assert_as_close_as_torch(out: torch.Tensor, conv: Conv2d, x: torch.Tensor) -> None:
    exact = reference(conv, x)
    torch_error = (conv._conv_forward(x, conv.weight, conv.bias).double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= 2 * torch_error + 1e-6, (error, torch_error)


def prepacked_and_accurate(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) in inference mode, which must run the prepacked path and be as close as PyTorch's own."""
    with torch.inference_mode():
        out, prepacked = ran_prepacked(conv, x)
    assert prepacked
    assert_as_close_as_torch(out, conv, x)
    return out


CASES = [  # (cin, cout, kernel, stride, padding, bias, input shape): inputs where prepacking pays
    (32, 64, 3, 1, 1, True, (2, 32, 9, 7)),     # batch > 1, odd sizes
    (96, 32, 3, 1, 1, True, (1, 96, 16, 16)),   # batch 1 above PyTorch's oneDNN threshold (24576 elements)
    (96, 32, 1, 1, 0, True, (1, 96, 16, 16)),   # 1x1
    (16, 16, 3, 2, 1, False, (3, 16, 11, 12)),  # stride 2, no bias
    (3, 8, 3, 2, 0, True, (4, 3, 9, 9)),        # Downsample2D's padding 0 (after its own F.pad)
]


@pytest.mark.parametrize("case", CASES)
def test_prepacked_matches_float64_conv_as_closely_as_torch(case):
    cin, cout, kernel, stride, padding, bias, shape = case
    conv, x = make_conv(cin, cout, kernel, stride=stride, padding=padding, bias=bias), channels_last_input(*shape)
    assert prepack_pays(x.shape)
    out = prepacked_and_accurate(conv, x)
    assert out.shape == conv._conv_forward(x, conv.weight, conv.bias).shape
    assert out.is_contiguous(memory_format=torch.channels_last)  # as PyTorch's own call returns it


def test_small_batch_one_inputs_keep_torchs_call():
    conv, x = make_conv(32, 32, 3), channels_last_input(1, 32, 16, 16)  # 8192 elements: PyTorch's im2col path
    assert not prepack_pays(x.shape)
    with torch.inference_mode():
        out, prepacked = ran_prepacked(conv, x)
    assert not prepacked
    torch.testing.assert_close(out.double(), reference(conv, x), rtol=1e-5, atol=1e-5)


def test_torchs_call_wherever_the_prepacked_one_does_not_apply():
    x = channels_last_input(2, 8, 6, 6)
    conv = make_conv(8, 8, 3)
    conv.backend = "ref"
    with torch.inference_mode():
        assert not ran_prepacked(conv, x)[1]  # another backend
    conv.backend = "auto"
    assert not ran_prepacked(conv, x.requires_grad_())[1]  # gradients: autograd must see PyTorch's op
    x = x.detach()
    as64 = copy.deepcopy(conv).double()
    with torch.inference_mode():
        out, prepacked = ran_prepacked(as64, x.double())  # float64
    assert not prepacked
    torch.testing.assert_close(out, reference(as64, x))
    contiguous = make_conv(8, 8, 3, channels_last=False)
    with torch.inference_mode():
        out, prepacked = ran_prepacked(contiguous, x.contiguous())  # PyTorch returns NCHW here; so must we
    assert not prepacked and out.is_contiguous()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_dispatch_modes_and_tracing_see_torchs_call():
    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    conv, x = make_conv(8, 8, 3), channels_last_input(2, 8, 6, 6)
    with torch.inference_mode(), Recorder() as recorder:
        conv(x)
    assert "aten.conv2d.default" in recorder.ops
    assert not any("_convolution_pointwise" in op for op in recorder.ops)
    with torch.no_grad():
        graph = str(torch.jit.trace(conv, x).graph)  # records only the ops it sees: they must be PyTorch's own
    assert "aten::_convolution" in graph and "_convolution_pointwise" not in graph


def test_weights_written_in_place_are_repacked():
    conv, x = make_conv(8, 16, 3), channels_last_input(2, 8, 6, 6)
    with torch.inference_mode():
        before = conv(x)
    state = {name: value * 2 for name, value in conv.state_dict().items()}
    conv.load_state_dict(state)  # copies in place: same address, new version
    with torch.inference_mode():
        after, prepacked = ran_prepacked(conv, x)
    assert prepacked
    torch.testing.assert_close(after, before * 2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.weight.zero_()
    with torch.inference_mode():
        assert ran_prepacked(conv, x)[0].sub(conv.bias[:, None, None]).abs().max().item() == 0


def test_a_replaced_weight_is_repacked_even_at_the_old_address_and_version():
    """An allocator may give a new parameter a freed one's memory, and both start at version 0: the packing must
    compare the tensor itself. Here the new parameter shares the old one's memory (from_numpy: a fresh version
    counter) and its values are written through NumPy, which no version counter sees."""
    conv, x = make_conv(8, 16, 3), channels_last_input(2, 8, 6, 6)
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone(memory_format=torch.channels_last))  # version 0
    with torch.inference_mode():
        conv(x)
    shared = torch.from_numpy(conv.weight.detach().numpy())  # same address, strides and version (0)
    assert (shared.data_ptr(), shared._version) == (conv.weight.data_ptr(), conv.weight._version)
    shared.numpy()[:] *= -1
    conv.weight = torch.nn.Parameter(shared)
    prepacked_and_accurate(conv, x)


def test_moved_weights_are_repacked():
    conv, x = make_conv(8, 16, 3), channels_last_input(2, 8, 6, 6)
    with torch.inference_mode():
        conv(x)
    conv.double().float()  # new float32 parameters at new addresses
    with torch.no_grad():
        conv.weight.mul_(-1)
    prepacked_and_accurate(conv, x)


def test_copies_and_pickles_of_a_prepacked_conv_work():
    conv, x = make_conv(8, 16, 3), channels_last_input(2, 8, 6, 6)
    with torch.inference_mode():
        expected = conv(x)
    assert conv.prepacked.entry is not None  # an opaque oneDNN tensor: neither copyable nor picklable
    for twin in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert twin.prepacked.entry is None
        with torch.inference_mode():
            out, prepacked = ran_prepacked(twin, x)
        assert prepacked
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_inference_mode_weights_keep_torchs_call():
    with torch.inference_mode():
        conv, x = make_conv(8, 16, 3), channels_last_input(2, 8, 6, 6)  # no version counter to watch
        out, prepacked = ran_prepacked(conv, x)
    assert not prepacked
    torch.testing.assert_close(out.double(), reference(conv, x), rtol=1e-5, atol=1e-5)


def test_loaded_models_prepack_their_large_convolutions_and_sample_as_torch_does():
    pipe = blitzdiff.load("unet-digits")
    kwargs = dict(n=4, steps=3, seeds=0, output_type="raw")
    with torch.profiler.profile() as prof:
        prepacked = pipe.sample(**kwargs)
    assert sum(event.name == PREPACKED_OP for event in prof.events()) > 0
    set_backend(pipe.model, "ref")  # PyTorch's convolutions (and the kernel specs)
    plain = pipe.sample(**kwargs)
    torch.testing.assert_close(prepacked, plain, rtol=1e-4, atol=1e-4)
