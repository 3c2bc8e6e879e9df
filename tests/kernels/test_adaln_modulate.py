"""blitzdiff.kernels.adaln_modulate / adaln_gated_residual: the kernels against the PyTorch specs.

Error budget (flash-attention style): against a float64 computation on the same inputs, a kernel's error is at most
2x that of plain PyTorch in the same precision (the spec for adaln_modulate, DiT's `x + gate * y` for the residual),
plus one ulp of the largest value; float64 agrees with the float64 spec to 1e-12. Row lengths are odd on purpose
(lane and tile tails); shift / scale / gate are read in place from chunks of a [B, 6D] modulation vector. Triton
runs on the GPU where there is one, else under its interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""

import sys

import pytest
import torch

from blitzdiff.kernels import adaln_gated_residual, adaln_gated_residual_ref, adaln_modulate, adaln_modulate_ref
from blitzdiff.kernels._backends import choose_backend, triton_interpreted
from blitzdiff.kernels.adaln_modulate import AUTO_ORDER, KERNEL_DTYPES

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode

SHAPES = [(2, 5, 37), (1, 3, 1), (3, 2, 7), (2, 4, 1152)]  # odd D; D = 1 (zero variance); D < 8 lanes; DiT-XL
KERNEL_BACKENDS = ["cpu", "triton"]


def on(backend):
    """The device a backend's tests run on here."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def make_inputs(shape, dtype, device="cpu", seed=0, offset=0.0):
    """(x, shift, scale, gate, y): x [B, N, D] (mean `offset`), the parameters chunks of one [B, 6D] vector."""
    g = torch.Generator().manual_seed(seed)
    batch, tokens, dim = shape

    def randn(*size):
        return torch.randn(size, generator=g, dtype=torch.float64).to(device, dtype)

    x = (randn(*shape) * 3 + offset).to(dtype)
    shift, scale, gate = randn(batch, 6 * dim).chunk(6, dim=1)[:3]  # views: row stride 6D, as a DiT block's
    return x, shift, scale, gate, randn(*shape)


def assert_within_budget(out, exact, plain):
    err = (out.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    assert err <= 2 * plain_err + torch.finfo(out.dtype).eps * exact.abs().max().item(), (err, plain_err)


def modulate_check(x, shift, scale, backend):
    out = adaln_modulate(x, shift, scale, 1e-6, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    exact = adaln_modulate_ref(x.double(), shift.double(), scale.double(), 1e-6)
    if x.dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    else:
        assert_within_budget(out, exact, adaln_modulate_ref(x, shift, scale, 1e-6))


def gated_check(residual, y, gate, backend):
    out = adaln_gated_residual(residual, y, gate, backend=backend)
    assert out.dtype == residual.dtype and out.shape == residual.shape and out.is_contiguous()
    exact = adaln_gated_residual_ref(residual.double(), y.double(), gate.double())
    if residual.dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    else:
        assert_within_budget(out, exact, residual + gate[:, None] * y)  # DiT's own ops, in the input dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_modulate_and_gated_residual(backend, shape, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's kernels take float16 / bfloat16 / float32 (test_bad_inputs checks the refusal)")
    x, shift, scale, gate, y = make_inputs(shape, dtype, on(backend))
    modulate_check(x, shift, scale, backend)
    gated_check(x, y, gate, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_mean_keeps_the_variance(backend):
    # mean 1000, std 3: a one-pass E[x^2] - E[x]^2 in float32 would lose most of the variance
    x, shift, scale, _, _ = make_inputs((2, 3, 257), torch.float32, on(backend), offset=1000.0)
    modulate_check(x, shift, scale, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    x, shift, scale, gate, y = make_inputs((2, 3, 37), dtype, TRITON_DEVICE)
    modulate_check(x, shift, scale, "triton")
    gated_check(x, y, gate, "triton")


@pytest.mark.parametrize("backend", ["ref", *KERNEL_BACKENDS])
def test_parameter_and_input_layouts(backend):
    x, shift, scale, gate, y = make_inputs((2, 5, 37), torch.float32, on(backend))
    expected = adaln_modulate_ref(x, shift, scale, 1e-6)
    layouts = {
        "in place chunks": (shift, scale),
        "contiguous": (shift.contiguous(), scale.contiguous()),
        "different row strides": (shift.contiguous(), scale),
        "transposed storage": (shift.t().contiguous().t(), scale),  # column-major [B, D]: copied
    }
    for name, (sh, sc) in layouts.items():
        torch.testing.assert_close(adaln_modulate(x, sh, sc, 1e-6, backend=backend), expected, msg=name)
    one = shift[:1].expand(2, -1)  # one row broadcast to the batch: row stride 0
    torch.testing.assert_close(adaln_modulate(x, one, scale, 1e-6, backend=backend),
                               adaln_modulate_ref(x, one.contiguous(), scale, 1e-6))
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous x: copied first
    assert not x_t.is_contiguous()
    torch.testing.assert_close(adaln_modulate(x_t, shift, scale, 1e-6, backend=backend), expected)
    torch.testing.assert_close(adaln_gated_residual(x_t, y, gate, backend=backend),
                               adaln_gated_residual_ref(x, y, gate))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bitwise_repeatable(backend):
    x, shift, scale, gate, y = make_inputs((2, 8, 1152), torch.float32, on(backend))
    first = adaln_modulate(x, shift, scale, backend=backend), adaln_gated_residual(x, y, gate, backend=backend)
    for _ in range(5):
        assert torch.equal(adaln_modulate(x, shift, scale, backend=backend), first[0])
        assert torch.equal(adaln_gated_residual(x, y, gate, backend=backend), first[1])


def test_empty_and_auto():
    x, shift, scale, gate, y = make_inputs((2, 0, 8), torch.float32)
    assert adaln_modulate(x, shift, scale, backend="cpu").shape == (2, 0, 8)
    assert adaln_gated_residual(x, y, gate, backend="cpu").shape == (2, 0, 8)
    x, shift, scale, gate, y = make_inputs((2, 3, 8), torch.float32)
    cpu = torch.device("cpu")
    assert choose_backend(cpu, torch.float32, KERNEL_DTYPES, AUTO_ORDER) == "cpu"  # the CPU kernel where built
    assert torch.equal(adaln_modulate(x, shift, scale, backend="auto"), adaln_modulate(x, shift, scale, backend="cpu"))
    assert choose_backend(cpu, torch.float16, KERNEL_DTYPES, AUTO_ORDER) == "ref"  # no CPU kernel: the spec
    half = [t.half() for t in (x, shift, scale)]
    out = adaln_modulate(*half, backend="auto")
    assert torch.equal(out, adaln_modulate_ref(*half))
    wide = [t.double() for t in half]  # and the spec is right in float16: LayerNorm, scale, shift in float64
    exact = torch.nn.functional.layer_norm(wide[0], (8,), eps=1e-6) * (1 + wide[2][:, None]) + wide[1][:, None]
    torch.testing.assert_close(out.double(), exact, rtol=2e-3, atol=2e-3)  # float16 keeps 11 bits: 5e-4 relative


@pytest.mark.parametrize("backend", ["ref", *KERNEL_BACKENDS])
def test_opcheck(backend):
    x, shift, scale, gate, y = make_inputs((2, 3, 9), torch.float32, on(backend))
    torch.library.opcheck(torch.ops.blitzdiff.adaln_modulate.default, (x, shift, scale, 1e-5), {"backend": backend})
    torch.library.opcheck(torch.ops.blitzdiff.adaln_gated_residual.default, (x, y, gate), {"backend": backend})


def test_compiles_fullgraph_on_cpu():
    def block(x, shift, scale, gate):
        h = adaln_modulate(x, shift, scale, 1e-6, backend="cpu")
        return adaln_gated_residual(x, h.tanh(), gate, backend="cpu")

    args = make_inputs((2, 3, 16), torch.float32)[:4]
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(*args), block(*args))


BAD_INPUTS = {
    # name: (call on valid float32 inputs x, shift, scale, gate, y; message)
    "x_rank": (lambda x, sh, sc, g, y: adaln_modulate(x[0], sh, sc, backend="cpu"), "x must be"),
    "shift_shape": (lambda x, sh, sc, g, y: adaln_modulate(x, sh[:, :3], sc, backend="cpu"), "shift must have"),
    "scale_dtype": (lambda x, sh, sc, g, y: adaln_modulate(x, sh, sc.double(), backend="cpu"), "scale.dtype"),
    "gate_device": (lambda x, sh, sc, g, y: adaln_gated_residual(x, y, g.to("meta"), backend="cpu"), "gate is on"),
    "y_shape": (lambda x, sh, sc, g, y: adaln_gated_residual(x, y[:1], g, backend="cpu"), "y must have"),
    "cpu_half": (lambda x, sh, sc, g, y: adaln_modulate(x.half(), sh.half(), sc.half(), backend="cpu"),
                 "takes float32, float64"),
    "triton_double": (lambda x, sh, sc, g, y: adaln_modulate(x.double(), sh.double(), sc.double(),
                                                             backend="triton"), "takes float16, bfloat16, float32"),
    "cuda_on_cpu": (lambda x, sh, sc, g, y: adaln_gated_residual(x, y, g, backend="cuda"), "needs tensors on cuda"),
    "backend": (lambda x, sh, sc, g, y: adaln_modulate(x, sh, sc, backend="fast"),
                "no backend 'fast'; allowed: ref, cpu, cuda, triton, auto"),
    "integer": (lambda x, sh, sc, g, y: adaln_modulate(x.long(), sh.long(), sc.long()), "floating point"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(*make_inputs((2, 3, 8), torch.float32))


def test_ref_differentiates_and_kernels_refuse_grad(monkeypatch):
    x, shift, scale, gate, y = make_inputs((2, 3, 8), torch.float32)
    gate.requires_grad_(True)
    adaln_gated_residual(x, y, gate, backend="ref").sum().backward()
    torch.testing.assert_close(gate.grad, y.sum(1))
    with pytest.raises(ValueError, match="not differentiable"):
        adaln_gated_residual(x, y, gate, backend="cpu")
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    with pytest.raises(RuntimeError, match="pip install -e"):
        adaln_modulate(x, shift, scale, backend="cpu")


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_within_2x_pytorch_error(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's kernels take float16 / bfloat16 / float32")
    for shape in [*SHAPES, (2, 1024, 1152), (4, 256, 1152)]:  # DiT-XL/2 at 512px and 256px
        for offset in (0.0, 100.0):
            x, shift, scale, gate, y = make_inputs(shape, dtype, "cuda", offset=offset)
            modulate_check(x, shift, scale, backend)
            gated_check(x, y, gate, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_repeatable_capturable_and_opcheck(backend):
    x, shift, scale, gate, y = make_inputs((2, 256, 1152), torch.float16, "cuda")
    first = adaln_modulate(x, shift, scale, backend=backend)
    for _ in range(10):
        assert torch.equal(adaln_modulate(x, shift, scale, backend=backend), first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = adaln_gated_residual(x, y, gate, backend=backend)
    y.mul_(2.0)  # replay reads the inputs' memory as it is now
    graph.replay()
    torch.testing.assert_close(captured, adaln_gated_residual_ref(x, y, gate))
    small = make_inputs((2, 3, 9), torch.float16, "cuda")
    torch.library.opcheck(torch.ops.blitzdiff.adaln_modulate.default, (*small[:3], 1e-6), {"backend": backend})
    assert adaln_modulate(*small[:3], backend="auto").dtype == torch.float16


def test_cpu_threads_give_the_same_bits():
    """The C++ kernels split rows over torch.get_num_threads() threads once a call has 2**16 elements per thread:
    any count gives the same bits, within the spec's budget (this size splits over up to 4 threads)."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 128, 1152, generator=gen) for _ in range(2))
    shift, scale, gate = (0.5 * torch.randn(2, 1152, generator=gen) for _ in range(3))
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append((adaln_modulate(x, shift, scale, 1e-6, backend="cpu"),
                            adaln_gated_residual(x, y, gate, backend="cpu")))
    finally:
        torch.set_num_threads(saved)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0], strict=True))
    torch.testing.assert_close(results[0][0], adaln_modulate_ref(x, shift, scale, 1e-6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], adaln_gated_residual_ref(x, y, gate))


@pytest.mark.parametrize("dim", [96, 33, 8, 1])
def test_cpu_row_groups_give_each_row_its_own_bits(dim):
    """On AVX-512 the float32 kernel takes its statistics four rows at a time, the rows past the last group one at a
    time: each row's result is the one it gets alone (the same bits; rows 0-3 here are a group, 4-6 are not)."""
    gen = torch.Generator().manual_seed(dim)
    x = 3 * torch.randn(2, 7, dim, generator=gen) + 1
    shift, scale = (torch.randn(2, dim, generator=gen) for _ in range(2))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = adaln_modulate(x, shift, scale, 1e-6, backend="cpu")
        alone = [adaln_modulate(x[:, i:i + 1].contiguous(), shift, scale, 1e-6, backend="cpu") for i in range(7)]
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(together, torch.cat(alone, dim=1))
    torch.testing.assert_close(together, adaln_modulate_ref(x, shift, scale, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    """The module's OpenMP (csrc/parallel.h) is torch's own libgomp.so.1: after the threaded kernels ran, the process
    maps one OpenMP runtime, not a second copy or another vendor's beside it."""
    x = torch.randn(4, 128, 1152)
    adaln_modulate(x, x[:, 0], x[:, 1], 1e-6, backend="cpu")
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    runtimes = {p for p in paths if any(name in p.rsplit("/", 1)[-1] for name in ("libgomp", "libomp", "libiomp"))}
    assert len(runtimes) == 1, runtimes
