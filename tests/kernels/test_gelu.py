"""blitzdiff.kernels.gelu_tanh: the kernels against torch's tanh GELU (the spec).

Error budget (flash-attention style): against a float64 computation on the same inputs, a kernel's error is at most
2x that of torch's own GELU in the same precision plus one ulp, each element's error scaled by max(|x|, 1); float64
agrees with the float64 spec to 1e-12 (1e-15 absolute). Inputs cover both tails (-2z past exp's range), zero,
denormals, infinities and NaN; sizes are odd (vector tails) and past the CPU kernel's thread split. Triton runs on
the GPU where there is one, else under its interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from blitzdiff.kernels import gelu_tanh, gelu_tanh_ref
from blitzdiff.kernels._backends import choose_backend, triton_interpreted
from blitzdiff.kernels.gelu import AUTO_ORDER, KERNEL_DTYPES, gelu_tanh_module_cpu

# Triton's interpreter computes in numpy, which warns where x^3 or exp overflows to inf (as the kernel allows)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode
KERNEL_BACKENDS = ["cpu", "triton"]
SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 1e-30, 5.0, -5.0, 9.0, -9.0, 10.0, -10.0, 30.0, -30.0, 88.0, -88.0, 1e20, -1e20]


def on(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def make_x(n, dtype, device="cpu", seed=0):
    """n values: a dense sweep of [-12, 12] (both tails of the exp), then 4 * N(0, 1), then the SPECIALS that
    `dtype` holds as finite numbers."""
    g = torch.Generator().manual_seed(seed)
    specials = [v for v in SPECIALS if abs(v) < torch.finfo(dtype).max]
    sweep = torch.linspace(-12, 12, n // 2, dtype=torch.float64)
    normal = 4 * torch.randn(n - n // 2 - len(specials), generator=g, dtype=torch.float64)
    return torch.cat([sweep, normal, torch.tensor(specials, dtype=torch.float64)]).to(dtype).to(device)


def scaled_error(out, x, exact):
    """max |out - exact| / max(|x|, 1): gelu's error grows with |x| (|gelu(x)| <= |x|), so each element's error is
    measured on its own scale (one budget for x = 0.1 and x = 1e20, and for the tails' tiny values)."""
    finite = exact.isfinite()
    scale = x.double().abs().clamp(min=1.0)
    return ((out.double() - exact).abs() / scale)[finite].max().item()


def assert_within_budget(out, x):
    exact = gelu_tanh_ref(x.double())
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out.isfinite().cpu(), exact.isfinite().cpu())
    if x.dtype == torch.float64:
        # atol: the float64 spec itself loses ~eps * |x| in the negative tail (1 + tanh(z) cancels there)
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-15)
        return
    err = scaled_error(out, x, exact)
    plain_err = scaled_error(gelu_tanh_ref(x.cpu()), x.cpu(), exact.cpu())  # torch's own, in x's dtype
    assert err <= 2 * plain_err + torch.finfo(out.dtype).eps, (err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 17, 1000, 70001])  # below, at and past the vector width and the thread split
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_within_2x_torch_error(backend, n, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's kernel takes float16 / bfloat16 / float32 (test_bad_inputs checks the refusal)")
    x = make_x(max(n, 2 * len(SPECIALS)), dtype, on(backend))[-n:]
    assert_within_budget(gelu_tanh(x, backend=backend), x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_negative_tail_without_cancellation(backend):
    """x / (1 + exp(-2z)) keeps its relative accuracy where 0.5 x (1 + tanh z) cancels (torch's float32 GELU: about
    100 ulps off at x = -3, 100% from x = -5.5). What is left grows with |2z| (a rounding of 2z is a relative error
    of the result times 2z): about 60 ulps at x = -7.4, 2z = 40."""
    x = torch.linspace(-8, -0.5, 20001, device=on(backend))
    x64 = x.double()  # the exact value: the float64 spec cancels too below x = -5 (tanh z rounds to -1)
    exact = x64 * torch.sigmoid(2 * 0.7978845608028654 * (x64 + 0.044715 * x64**3))
    def ulps(out):
        return ((out.double() - exact).abs() / (exact.abs() * torch.finfo(torch.float32).eps)).max().item()
    assert ulps(gelu_tanh(x, backend=backend)) <= 128 and ulps(gelu_tanh_ref(x)) > 1e6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_infinities_and_nan_as_torch(backend):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0], device=on(backend))
    out = gelu_tanh(x, backend=backend)
    ref = gelu_tanh_ref(x)  # inf, nan (-inf * 0), nan, -0, 0
    assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref)) and torch.equal(out.signbit(), ref.signbit())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    x = make_x(1000, dtype, TRITON_DEVICE)
    assert_within_budget(gelu_tanh(x, backend="triton"), x)


def test_layouts_shapes_and_auto():
    x = make_x(3 * 5 * 7, torch.float32).reshape(3, 5, 7)
    x_t = x.transpose(0, 2)  # read by copy
    for backend in ("ref", "cpu", "auto"):
        assert_within_budget(gelu_tanh(x_t, backend=backend), x_t)
    assert gelu_tanh(x, backend="cpu").is_contiguous() and gelu_tanh(torch.empty(0, 3), backend="cpu").shape == (0, 3)
    assert choose_backend(x.device, torch.float32, KERNEL_DTYPES, AUTO_ORDER) == "cpu"
    assert choose_backend(x.device, torch.bfloat16, KERNEL_DTYPES, AUTO_ORDER) == "ref"
    assert gelu_tanh(x.bfloat16(), backend="auto").dtype == torch.bfloat16  # ref: torch's bfloat16 GELU


def test_cpu_threads_give_the_same_bits():
    """The C++ kernel splits from 2**13 elements per thread: any thread count gives the same bits."""
    x = make_x(100003, torch.float32)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(gelu_tanh(x, backend="cpu"))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    # and an element's bits do not depend on its position (vector body or tail)
    assert torch.equal(gelu_tanh(x[5:], backend="cpu"), results[0][5:])


def test_module_call_is_the_ops_result_in_place():
    x = make_x(4097, torch.float32).reshape(1, 17, 241)
    expected = gelu_tanh(x, backend="cpu")
    target = x.clone()
    assert gelu_tanh_module_cpu(target) is target and torch.equal(target, expected)
    with torch.profiler.profile() as prof:
        gelu_tanh_module_cpu(x.clone())
    assert "blitzdiff::gelu_tanh" in {event.name for event in prof.events()}


def test_module_call_declines_what_the_op_must_run(monkeypatch):
    x = make_x(64, torch.float32).reshape(4, 16)
    leaf = x.clone().requires_grad_()
    for declined in (x.half(), x.t(), leaf):  # dtype, layout, gradients
        before = declined.detach().clone()
        assert gelu_tanh_module_cpu(declined) is None and torch.equal(declined.detach(), before)
    with torch.no_grad():
        assert gelu_tanh_module_cpu(leaf.detach().clone()) is not None
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)
    assert gelu_tanh_module_cpu(x.clone()) is None


BAD_INPUTS = {
    "integer": (lambda x: gelu_tanh(x.long()), "floating point"),
    "cpu_half": (lambda x: gelu_tanh(x.half(), backend="cpu"), "takes float32, float64"),
    "triton_double": (lambda x: gelu_tanh(x.double(), backend="triton"), "takes float16, bfloat16, float32"),
    "cuda_on_cpu": (lambda x: gelu_tanh(x, backend="cuda"), "needs x on cuda"),
    "backend": (lambda x: gelu_tanh(x, backend="fast"), "no backend 'fast'; allowed: ref, cpu, cuda, triton, auto"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(make_x(40, torch.float32))


def test_ref_differentiates_kernels_refuse_grad_and_compile_sees_one_op(monkeypatch):
    x = torch.linspace(-6, 6, 40).requires_grad_()
    gelu_tanh(x, backend="ref").sum().backward()
    x64 = x.detach().double().requires_grad_()
    F.gelu(x64, approximate="tanh").sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float())
    with pytest.raises(ValueError, match="not differentiable"):
        gelu_tanh(x, backend="cpu")
    with torch.no_grad():
        compiled = torch.compile(lambda t: gelu_tanh(t, backend="cpu") * 2, fullgraph=True)
        torch.testing.assert_close(compiled(x), gelu_tanh(x, backend="cpu") * 2)
    torch.library.opcheck(torch.ops.blitzdiff.gelu_tanh.default, (x.detach()[:9],), {"backend": "cpu"})
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    with pytest.raises(RuntimeError, match="pip install -e"):
        gelu_tanh(x.detach(), backend="cpu")


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_within_2x_torch_error_and_capturable(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's kernel takes float16 / bfloat16 / float32")
    x = make_x(2 * 256 * 4608 + 7, dtype, "cuda")  # DiT-XL/2's MLP at 256px, batch 2, plus a tail
    out = gelu_tanh(x, backend=backend)
    assert_within_budget(out, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gelu_tanh(x, backend=backend)
    x.mul_(0.5)
    graph.replay()
    torch.testing.assert_close(captured, gelu_tanh(x, backend=backend), rtol=0, atol=0)
