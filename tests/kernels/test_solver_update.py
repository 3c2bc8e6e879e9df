"""blitzdiff.kernels.solver_update: the csrc kernels against the PyTorch spec `solver_update_ref`.

Error budget (flash-attention style): measured against a float64 computation on the same inputs, a kernel's
float32 error is at most 2x plain PyTorch float32's error (+ one ulp of the largest value); float64 agrees with
the float64 spec to 1e-12. Sizes are odd on purpose: they hit vector-width and block tails.
"""

import sys

import pytest
import torch

from blitzdiff.kernels import solver_update, solver_update_ref

SIZES = [1, 7, 1023, 4097]
COEFS = (0.9, -0.35, 0.12, 0.05)  # a, b, c, s: magnitudes of a DPM-Solver++(2M) SDE step
TERMS = ["all", "no_d1", "no_noise", "neither"]  # which optional tensors are passed (the others are None)


def make_inputs(shape, dtype, terms="all", device="cpu", seed=0):
    """(x, d0, d1, noise, a, b, c, s); an absent tensor is None and its coefficient 0.0."""
    g = torch.Generator().manual_seed(seed)
    x, d0, d1, noise = (torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4))
    a, b, c, s = COEFS
    if terms in ("no_d1", "neither"):
        d1, c = None, 0.0
    if terms in ("no_noise", "neither"):
        noise, s = None, 0.0
    return x, d0, d1, noise, a, b, c, s


def map_tensors(fn, args):
    """Apply fn to the tensors of an argument tuple (None and the coefficients pass through)."""
    return tuple(fn(t) if isinstance(t, torch.Tensor) else t for t in args)


def max_error(out, args):
    """(max |out - exact|, max |exact|), `exact` the float64 update of the same (already rounded) inputs."""
    *tensors, a, b, c, s = args
    exact = solver_update_ref(*(None if t is None else t.double() for t in tensors), a, b, c, s)
    return (out.double() - exact).abs().max().item(), exact.abs().max().item()


def assert_within_budget(out, args):
    """The kernel's error is at most 2x that of plain PyTorch at the same precision, plus one ulp of the output."""
    *tensors, a, b, c, s = args
    eager = a * tensors[0] + b * tensors[1]  # plain PyTorch: one rounding per op, in the input dtype
    eager = eager if tensors[2] is None else eager + c * tensors[2]
    eager = eager if tensors[3] is None else eager + s * tensors[3]
    err, scale = max_error(out, args)
    eager_err, _ = max_error(eager, args)
    assert err <= 2 * eager_err + torch.finfo(out.dtype).eps * scale, (err, eager_err)


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_float32_within_2x_pytorch_error(n, terms):
    args = make_inputs(n, torch.float32, terms)
    out = solver_update(*args, backend="cpu")
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert_within_budget(out, args)


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_float64_matches_spec(n, terms):
    args = make_inputs(n, torch.float64, terms)
    out = solver_update(*args, backend="cpu")
    torch.testing.assert_close(out, solver_update_ref(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bitwise_repeatable(dtype):
    args = make_inputs((3, 4097), dtype)
    first = solver_update(*args, backend="cpu")
    for _ in range(20):
        assert torch.equal(solver_update(*args, backend="cpu"), first)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_non_contiguous_inputs_are_made_contiguous(backend):
    # [5, 3] transposed views: the op copies them to dense memory and returns a contiguous result.
    views = map_tensors(torch.Tensor.t, make_inputs((3, 5), torch.float32))
    assert not views[0].is_contiguous()
    out = solver_update(*views, backend=backend)
    assert out.is_contiguous() and out.shape == (5, 3)
    assert torch.equal(out, solver_update(*map_tensors(torch.Tensor.contiguous, views), backend=backend))


def test_empty_tensor():
    args = make_inputs((0, 4), torch.float32)
    assert solver_update(*args, backend="cpu").shape == (0, 4)


OPCHECK_CASES = {
    "all": make_inputs((2, 3, 5), torch.float32),
    "absent": make_inputs((2, 3, 5), torch.float64, "neither"),
    "non_contiguous": map_tensors(lambda t: t.transpose(0, 2), make_inputs((2, 3, 5), torch.float32, "no_d1")),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_opcheck(backend, case):
    torch.library.opcheck(torch.ops.blitzdiff.solver_update.default, OPCHECK_CASES[case], {"backend": backend})


def test_compiles_fullgraph_on_cpu():
    def step(x, d0, d1, noise, a, b):
        # The op inside a traced region, between ordinary ops, with coefficients that vary per call.
        return solver_update(x * 1.0, d0, d1, noise, a, b, 0.12, 0.05, backend="cpu").sin()

    compiled = torch.compile(step, fullgraph=True)
    x, d0, d1, noise, a, b, _, _ = make_inputs((2, 4, 8, 8), torch.float32)
    for a_, b_ in ((a, b), (0.5, -0.25)):
        torch.testing.assert_close(compiled(x, d0, d1, noise, a_, b_), step(x, d0, d1, noise, a_, b_))


def _replace(args, i, value):
    return (*args[:i], value, *args[i + 1 :])


BAD_INPUTS = {
    # name: (change to valid float32 args, backend, what the message must mention)
    "shape": (lambda a: _replace(a, 1, a[1][:-1]), "cpu", "d0.shape"),
    "dtype": (lambda a: _replace(a, 2, a[2].double()), "cpu", "d1.dtype"),
    "device": (lambda a: _replace(a, 3, a[3].to("meta")), "cpu", "noise is on meta"),
    "backend": (lambda a: a, "triton", "allowed: ref, cpu, cuda"),
    "missing_d1": (lambda a: _replace(a, 2, None), "cpu", "d1 is None but its coefficient"),
    "missing_noise": (lambda a: _replace(a, 3, None), "ref", "noise is None but its coefficient"),
    "integer": (lambda a: map_tensors(torch.Tensor.long, a), "ref", "floating point"),
    "cpu_half": (lambda a: map_tensors(torch.Tensor.half, a), "cpu", "takes float32, float64"),
    "cuda_on_cpu": (lambda a: a, "cuda", "needs tensors on cuda"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    change, backend, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        solver_update(*change(make_inputs(7, torch.float32)), backend=backend)


def test_ref_differentiates_and_kernels_refuse_grad():
    # The op's Autograd key falls through (blitzdiff/kernels/_library.py): the spec's own ops carry gradients,
    # a compiled kernel says it cannot instead of dropping them.
    x, d0, d1, noise, a, b, c, s = make_inputs(7, torch.float32)
    x.requires_grad_(True)
    solver_update(x, d0, d1, noise, a, b, c, s, backend="ref").sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, a))
    with pytest.raises(ValueError, match="not differentiable"):
        solver_update(x, d0, d1, noise, a, b, c, s, backend="cpu")
    with torch.no_grad():
        solver_update(x, d0, d1, noise, a, b, c, s, backend="cpu")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    with pytest.raises(RuntimeError, match="pip install -e"):
        solver_update(*make_inputs(7, torch.float32), backend="cpu")


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.cuda
@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("n", SIZES + [1 << 22])
def test_cuda_within_2x_pytorch_error(n, dtype, terms):
    args = make_inputs(n, dtype, terms, device="cuda")
    out = solver_update(*args, backend="cuda")
    assert out.dtype == dtype and out.device == args[0].device
    if dtype == torch.float64:
        torch.testing.assert_close(out, solver_update_ref(*args), rtol=1e-12, atol=1e-12)
    else:
        assert_within_budget(out, args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_bitwise_repeatable(dtype):
    args = make_inputs((3, 4097), dtype, device="cuda")
    first = solver_update(*args, backend="cuda")
    for _ in range(20):
        assert torch.equal(solver_update(*args, backend="cuda"), first)


@pytest.mark.cuda
def test_cuda_side_stream_and_graph_capture():
    args = make_inputs((4, 4, 64, 64), torch.float32, device="cuda")
    expected = solver_update(*args, backend="ref")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches on torch's current stream, not the default one
        out = solver_update(*args, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = solver_update(*args, backend="cuda")
    args[0].mul_(2.0)  # replay reads the inputs' memory as it is now
    graph.replay()
    torch.testing.assert_close(captured, solver_update(*args, backend="ref"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_opcheck(dtype):
    args = make_inputs((2, 3, 5), dtype, "no_noise", device="cuda")
    torch.library.opcheck(torch.ops.blitzdiff.solver_update.default, args, {"backend": "cuda"})
