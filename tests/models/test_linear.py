"""blitzdiff.models.linear: the models' linear layers on blitzdiff's register-tiled kernel (eager CPU float32 calls
with at most DIRECT_MAX_IN_FEATURES inputs), F.linear everywhere else.

Accuracy is bounded by the dot products' rounding bound, not by a snapshot: each output is one multiply-add chain of
in_features + 1 terms (bias first), so |out - exact| <= gamma(in + 1) * (|b| + sum |x_i w_i|) with
gamma(n) = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); PyTorch's own
F.linear meets it too.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import blitzdiff
from blitzdiff.models import linear as linear_module
from blitzdiff.models import set_backend
from blitzdiff.models.linear import DIRECT_MAX_IN_FEATURES, DirectLinear, Linear

from .dispatch import OpRecorder

KERNEL_RANGE = "blitzdiff::linear_direct"
UNIT_ROUNDOFF = 2.0**-24

pytestmark = pytest.mark.skipif(linear_module.cpu_kernel("Conv2dNhwc") is None, reason="blitzdiff._C is not built")


@pytest.fixture(autouse=True)
def kernel_everywhere(monkeypatch):
    """`applies` as on an AVX-512 CPU, so the kernel runs on any CI machine (its portable loop elsewhere)."""
    monkeypatch.setattr(linear_module, "direct_isa", lambda: "avx512f")


def make_linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    layer = Linear(in_features, out_features, bias=bias)
    layer.backend = "auto"
    return layer


def rows_of(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ran_kernel(layer: Linear, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """layer(x), and whether the kernel ran (its profiler range) rather than PyTorch's linear."""
    with torch.profiler.profile() as prof:
        out = layer(x)
    names = {event.name for event in prof.events()}
    kernel = KERNEL_RANGE in names
    assert kernel != ("aten::linear" in names), names  # exactly one of them
    return out, kernel


def assert_within_dot_product_bound(out: torch.Tensor, layer: Linear, x: torch.Tensor) -> None:
    """|out - exact| <= gamma(in + 1) * (|b| + |x| |W|^T) elementwise (module docstring), exact in float64."""
    weight, bias = layer.weight.double(), None if layer.bias is None else layer.bias.double()
    exact = F.linear(x.double(), weight, bias)
    magnitude = F.linear(x.double().abs(), weight.abs(), None if bias is None else bias.abs())
    terms = layer.in_features + 1
    gamma = terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)
    excess = (out.double() - exact).abs() - gamma * magnitude
    assert excess.max().item() <= 0, excess.max().item()


def assert_kernel_within_bound(layer: Linear, x: torch.Tensor) -> None:
    """layer(x) runs the kernel and meets the bound (of the weights as they are now)."""
    out, kernel = ran_kernel(layer, x)
    assert kernel
    assert_within_dot_product_bound(out, layer, x)


SHAPES = [  # (input shape, out_features, bias)
    ((1, 7), 5, True),                       # one row, fewer outputs than a 16-lane block
    ((16, 96), 288, True),                   # dit-digits' qkv on 16 rows
    ((2, 64, 96), 96, False),                # 3-D input (a DiT's tokens), no bias
    ((3, 384), 33, True),                    # a block and a bit
    ((96,), 17, True),                       # 1-D input
    ((9, DIRECT_MAX_IN_FEATURES), 40, True),  # the largest input count taking the kernel
    ((1, 1), 1, True),
]


@pytest.mark.parametrize("shape, out_features, bias", SHAPES)
def test_the_kernel_meets_the_dot_product_rounding_bound(shape, out_features, bias):
    layer, x = make_linear(shape[-1], out_features, bias), rows_of(*shape)
    with torch.no_grad():
        assert_kernel_within_bound(layer, x)
        assert layer(x).shape == (*shape[:-1], out_features) and layer(x).dtype == torch.float32
        assert_within_dot_product_bound(F.linear(x, layer.weight, layer.bias), layer, x)  # PyTorch's meets it too


def test_a_rows_values_depend_neither_on_the_other_rows_nor_on_the_thread_count():
    layer, x = make_linear(96, 288), rows_of(37, 96)
    threads = torch.get_num_threads()
    outs = []
    try:
        with torch.no_grad():
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                outs.append(layer(x))
            alone = layer(x[11:12])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(alone, outs[0][11:12])


def test_torchs_linear_wherever_the_kernel_does_not_apply():
    layer, x = make_linear(32, 24), rows_of(5, 32)
    with torch.no_grad():
        assert ran_kernel(layer, x)[1]
        layer.backend = "ref"
        assert not ran_kernel(layer, x)[1]  # another backend
        layer.backend = "auto"
        assert not ran_kernel(layer, x.t().contiguous().t())[1]  # a non-contiguous input
        assert not ran_kernel(layer, rows_of(0, 32))[1]  # no rows
        as64 = copy.deepcopy(layer).double()
        out, kernel = ran_kernel(as64, x.double())  # float64
        assert not kernel and torch.equal(out, F.linear(x.double(), as64.weight, as64.bias))
        wide = make_linear(DIRECT_MAX_IN_FEATURES + 1, 8)
        assert not ran_kernel(wide, rows_of(3, DIRECT_MAX_IN_FEATURES + 1))[1]  # past the measured bound
    out, kernel = ran_kernel(layer, x.requires_grad_())  # gradients: autograd must see PyTorch's op
    assert not kernel
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 32))


def test_autocast_and_other_devices_keep_torchs_linear():
    layer, x = make_linear(32, 24), rows_of(5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, kernel = ran_kernel(layer, x)
    assert not kernel and out.dtype == torch.bfloat16  # as PyTorch's linear returns it under autocast
    layer.to("meta")
    with torch.no_grad(), pytest.raises(RuntimeError, match="device"):  # PyTorch's error, not the kernel's crash
        layer(x)


def test_a_cpu_without_the_measured_loop_keeps_torchs_linear(monkeypatch):
    monkeypatch.setattr(linear_module, "direct_isa", lambda: "generic")  # the only loop measured is AVX-512's
    with torch.no_grad():
        assert not ran_kernel(make_linear(32, 24), rows_of(5, 32))[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_dispatch_modes_and_tracing_see_torchs_linear():
    layer, x = make_linear(32, 24), rows_of(5, 32)
    with torch.no_grad(), OpRecorder() as recorder:
        layer(x)
    assert "aten.addmm.default" in recorder.ops and layer.direct.entry is None
    with torch.no_grad():
        graph = str(torch.jit.trace(layer, x).graph)  # records only the ops it sees: they must be PyTorch's own
    assert "aten::linear" in graph


def test_weights_written_in_place_are_blocked_again():
    layer, x = make_linear(48, 20), rows_of(6, 48)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict({name: value * 2 for name, value in layer.state_dict().items()})  # in place
        after, kernel = ran_kernel(layer, x)
        assert kernel
        torch.testing.assert_close(after, before * 2, rtol=1e-5, atol=1e-5)
        layer.weight.zero_()
        assert torch.equal(layer(x), layer.bias.expand(6, 20))
        layer.bias.copy_(torch.arange(20.0))  # the bias is read per call, never copied
        assert torch.equal(layer(x), torch.arange(20.0).expand(6, 20))


def test_a_replaced_weight_is_blocked_again_even_at_the_old_address_and_version():
    """As for conv.Conv2d: a new parameter may get a freed one's memory and both start at version 0, so the entry
    compares the tensor itself. The new parameter shares the old one's memory (from_numpy: a fresh version counter),
    its values written through NumPy, which no version counter sees."""
    layer, x = make_linear(48, 20), rows_of(6, 48)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    with torch.no_grad():
        layer(x)
        shared = torch.from_numpy(layer.weight.detach().numpy())
        assert (shared.data_ptr(), shared._version) == (layer.weight.data_ptr(), layer.weight._version)
        shared.numpy()[:] *= -1
        layer.weight = torch.nn.Parameter(shared)
        assert_kernel_within_bound(layer, x)


def test_moved_weights_are_blocked_again():
    layer, x = make_linear(48, 20), rows_of(6, 48)
    with torch.no_grad():
        layer(x)
        layer.double().float()  # new float32 parameters at new addresses
        layer.weight.mul_(-1)
        assert_kernel_within_bound(layer, x)


def test_copies_and_pickles_of_a_used_layer_work():
    layer, x = make_linear(48, 20), rows_of(6, 48)
    with torch.no_grad():
        expected = layer(x)
    assert layer.direct.entry is not None  # holds a C++ object: neither copied nor pickled
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.direct.entry is None and isinstance(twin.direct, DirectLinear)
        with torch.no_grad():
            out, kernel = ran_kernel(twin, x)
        assert kernel and torch.equal(out, expected)


def test_inference_mode_weights_keep_torchs_linear():
    with torch.inference_mode():
        layer, x = make_linear(48, 20), rows_of(6, 48)  # no version counter to watch
        out, kernel = ran_kernel(layer, x)
    assert not kernel
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def kernel_calls(pipe, **kwargs) -> tuple[torch.Tensor, int]:
    """pipe.sample(**kwargs) under the profiler (which runs the forward eagerly), and the kernel's calls."""
    with torch.profiler.profile() as prof:
        out = pipe.sample(**kwargs)
    return out, sum(event.name == KERNEL_RANGE for event in prof.events())


@pytest.mark.parametrize("model, per_forward", [
    # dit-digits: 6 blocks x (packed qkv, out, ff in, ff out) + the packed t-MLPs' first layer + the final adaLN and
    # projection (the t-MLPs' second layers and the adaLN layers run as batched GEMMs: models.dit)
    ("dit-digits", 6 * 4 + 1 + 2),
    # unet-digits: its time MLP (2), the packed time projections, its attention blocks' linears
    ("unet-digits", None),
])
def test_loaded_models_run_the_kernel_and_sample_as_torch_does(model, per_forward):
    pipe = blitzdiff.load(model)
    kwargs = dict(n=2, steps=3, seeds=0, output_type="raw", **({"class_labels": 3} if model == "dit-digits" else {}))
    out, calls = kernel_calls(pipe, **kwargs)
    evaluations = 3  # DPM-Solver++(2M): one network call a step, guided in one batch
    if per_forward is None:
        assert calls > 0 and calls % evaluations == 0
    else:
        assert calls == per_forward * evaluations
    set_backend(pipe.model, "ref")  # PyTorch's linears (and the other kernels' specs)
    assert kernel_calls(pipe, **kwargs)[1] == 0
    torch.testing.assert_close(out, pipe.sample(**kwargs), rtol=1e-4, atol=1e-4)
