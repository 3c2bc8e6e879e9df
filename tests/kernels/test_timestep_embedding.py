"""blitzdiff.kernels.timestep_embedding / timestep_mlp: the kernels against the PyTorch specs.

Error budget (flash-attention style): against a float64 computation, a kernel's error is at most 2x that of the
spec run in the same precision, plus one ulp of the largest value. Embedding sizes cover odd dims (the zero pad),
both column orders and shifts, DiT's and SD's sizes, and timesteps of every dtype and stride the models pass.
Triton runs on the GPU where there is one, else under its interpreter (TRITON_INTERPRET=1) on CPU tensors (the
interpreter truncates float32 -> bfloat16 where a GPU rounds; the budget absorbs it).
"""

import math
import sys

import pytest
import torch

from blitzdiff.kernels import timestep_embedding, timestep_embedding_ref, timestep_mlp, timestep_mlp_ref
from blitzdiff.kernels._backends import triton_interpreted

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode

TIMESTEPS = torch.tensor([0, 1, 17, 250, 500, 999])
# name: (dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
CONFIGS = {
    "sd": (320, True, 0.0, 1.0, 10000.0),
    "dit": (256, True, 1.0, 1.0, 10000.0),  # DiT's frequency embedding size, diffusers' default shift
    "odd": (9, False, 1.0, 1.0, 10000.0),
    "flow": (64, False, 0.0, 1000.0, 100.0),  # fractional timesteps scaled up
    "one": (1, True, 0.0, 1.0, 10000.0),  # no frequencies, only the pad
}
KERNEL_BACKENDS = ["cpu", "triton"]


def on(backend):
    """The device a backend's tests run on here."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def options(config):
    dim, flip, shift, scale, max_period = CONFIGS[config]
    return dim, {"flip_sin_to_cos": flip, "downscale_freq_shift": shift, "scale": scale, "max_period": max_period}


def exact_embedding(timesteps, dim, *, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    """The formula in float64, written independently of the spec."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float64)
    args = scale * timesteps.double()[:, None] * max_period ** (-j / (half - downscale_freq_shift))[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)
    return torch.cat([emb, torch.zeros(len(timesteps), dim - 2 * half, dtype=torch.float64)], dim=1)


def assert_within_budget(out, exact, plain):
    exact = exact.to(out.device)
    err = (out.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    assert err <= 2 * plain_err + torch.finfo(out.dtype).eps * exact.abs().max().item(), (err, plain_err)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_embedding_within_2x_spec_error(backend, config):
    dim, opts = options(config)
    t = (TIMESTEPS / 1000.0 if config == "flow" else TIMESTEPS).to(on(backend))
    out = timestep_embedding(t, dim, **opts, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (len(t), dim) and out.is_contiguous()
    assert_within_budget(out, exact_embedding(t.cpu(), dim, **opts), timestep_embedding_ref(t, dim, **opts))


def test_spec_matches_the_formula():
    for config in CONFIGS:
        dim, opts = options(config)
        t = TIMESTEPS / 1000.0 if config == "flow" else TIMESTEPS
        torch.testing.assert_close(timestep_embedding_ref(t, dim, **opts).double(), exact_embedding(t, dim, **opts),
                                   atol=1e-4, rtol=0)  # float32 arguments near 1000 carry ~6e-5 of rounding


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_timestep_dtypes_and_strides(backend):
    dim, opts = options("sd")
    steps = TIMESTEPS.to(on(backend))
    expected = timestep_embedding(steps, dim, **opts, backend=backend)
    for t in (steps.int(), steps.float(), steps.double(), steps.half(), steps.to(torch.int16)):
        assert torch.equal(timestep_embedding(t, dim, **opts, backend=backend), expected), t.dtype
    strided = torch.stack([steps, -steps], dim=1)[:, 0]  # stride 2
    assert torch.equal(timestep_embedding(strided, dim, **opts, backend=backend), expected)
    # a timestep broadcast to the batch (stride 0), as the models pass it
    one = torch.tensor([250], device=steps.device).expand(4)
    assert torch.equal(timestep_embedding(one, dim, **opts, backend=backend), expected[3:4].expand(4, -1))
    # rounded to float32 first, as .float() does
    fractional = torch.tensor([0.5, 999.7], dtype=torch.float64, device=steps.device)
    torch.testing.assert_close(timestep_embedding(fractional, dim, **opts, backend=backend),
                               timestep_embedding_ref(fractional, dim, **opts), rtol=0, atol=1e-6)


def spec_arguments(t, dim, scale):
    """The float32 arguments of sin / cos as the spec forms them: scale * (t.float() * freq_j) (max_period 10000)."""
    freqs = sys.modules["blitzdiff.kernels.timestep_embedding"].frequencies(dim // 2, 0.0, 10000.0, t.device)
    return scale * (t.float()[:, None] * freqs[None, :])


def test_cpu_sin_cos_are_the_correctly_rounded_values():
    """The C++ kernel's own sin / cos (csrc/sincos.h), over 262144 arguments from 0 to +-262144 (every quadrant,
    arguments up to the kernel's fast-path limit): each the float32 rounding of the float64 sin / cos of the spec's
    float32 argument, but for rare ties, which are off by at most one ulp. PyTorch's float32 sin is within an ulp."""
    t = torch.linspace(-2.0**18, 2.0**18, 2048, dtype=torch.float64) + torch.rand(2048, dtype=torch.float64,
                                                                                 generator=torch.Generator().manual_seed(0))
    out = timestep_embedding(t, 256, flip_sin_to_cos=False, downscale_freq_shift=0.0, backend="cpu")
    args = spec_arguments(t, 256, 1.0).double()
    exact = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    rounded = exact.float()
    off = out != rounded
    assert off.float().mean().item() < 1e-3, f"{int(off.sum())} of {off.numel()} not correctly rounded"
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(2.0**-126)  # an ulp at most, where off
    assert ((out.double() - exact).abs() <= ulp).all()


def test_cpu_large_and_non_finite_timesteps_take_libm():
    """Rows whose arguments may pass the fast path's 2**20 (here 3e6 and 1e30) and NaN / Inf timesteps: the C
    library's sin / cos, within an ulp of the float64 values; NaN and Inf give NaN, as the spec does."""
    t = torch.tensor([3e6, -1e30, float("nan"), float("inf"), 5.0])
    out = timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0.0, backend="cpu")
    ref = timestep_embedding_ref(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    assert torch.equal(out.isnan(), ref.isnan()) and out[2:4].isnan().all()
    args = spec_arguments(t[[0, 1, 4]], 64, 1.0).double()
    exact = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    assert ((out[[0, 1, 4]].double() - exact).abs() <= torch.finfo(torch.float32).eps).all()


def test_frequency_table_is_computed_once(monkeypatch):
    module = sys.modules["blitzdiff.kernels.timestep_embedding"]
    monkeypatch.setattr(module, "_TABLES", {})
    calls = []
    original = module.frequencies
    monkeypatch.setattr(module, "frequencies", lambda *args: calls.append(args) or original(*args))
    for t in (TIMESTEPS, TIMESTEPS + 1, TIMESTEPS[:2]):
        timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0.0, backend="cpu")
    assert len(calls) == 1  # per (half, shift, max_period, device), not per call
    table = module.frequency_table(160, 0.0, 10000.0, torch.device("cpu"))
    assert torch.equal(table, original(160, 0.0, 10000.0, torch.device("cpu")))  # the spec's bits
    timestep_embedding(TIMESTEPS, 256, flip_sin_to_cos=True, downscale_freq_shift=1.0, backend="cpu")
    assert len(calls) == 2  # another configuration: its own table


def mlp_weights(dim, hidden, out, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*size, std):
        return (torch.randn(size, generator=g, dtype=torch.float64) * std).to(device, dtype)

    w1, w2 = randn(hidden, dim, std=dim**-0.5), randn(out, hidden, std=hidden**-0.5)
    b1, b2 = (randn(hidden, std=0.5), randn(out, std=0.5)) if bias else (None, None)
    return w1, b1, w2, b2


def mlp_check(weights, backend, config="sd", t=TIMESTEPS):
    _, opts = options(config)
    t = t.to(weights[0].device)
    out = timestep_mlp(t, *weights, **opts, backend=backend)
    assert out.dtype == weights[0].dtype and out.shape == (len(t), weights[2].shape[0])
    exact = timestep_mlp_ref(t.double(), *(None if w is None else w.double() for w in weights), **opts)
    assert_within_budget(out, exact, timestep_mlp_ref(t, *weights, **opts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mlp_within_2x_spec_error(backend, dtype):
    with torch.no_grad():
        mlp_check(mlp_weights(37, 48, 40, dtype, on(backend)), backend, "odd" if backend == "triton" else "sd")
        mlp_check(mlp_weights(37, 48, 40, dtype, on(backend), bias=False), backend, "odd")


def test_mlp_cpu_at_model_sizes():
    with torch.no_grad():
        mlp_check(mlp_weights(320, 1280, 1280, torch.float32), "cpu", "sd")  # SD1.5's time embedding
        mlp_check(mlp_weights(256, 1152, 1152, torch.float32), "cpu", "dit", TIMESTEPS[:2])  # DiT-XL/2's


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mlp_tile_tails_and_repeatability(backend):
    # more than one 16-row, 32-column and 64-deep tile of the fused kernel, none of them full
    t = torch.arange(19, device=on(backend)) * 50
    weights = mlp_weights(130, 70, 24, torch.float32, on(backend))
    with torch.no_grad():
        mlp_check(weights, backend, "sd", t)
        first = timestep_mlp(t, *weights, backend=backend)
        for _ in range(3):
            assert torch.equal(timestep_mlp(t, *weights, backend=backend), first)


def test_auto_and_empty():
    dim, opts = options("sd")
    assert torch.equal(timestep_embedding(TIMESTEPS, dim, **opts, backend="auto"),
                       timestep_embedding(TIMESTEPS, dim, **opts, backend="cpu"))
    assert timestep_embedding(TIMESTEPS[:0], dim, **opts, backend="cpu").shape == (0, dim)
    weights = mlp_weights(16, 8, 4, torch.float32)
    with torch.no_grad():
        assert torch.equal(timestep_mlp(TIMESTEPS, *weights, backend="auto"),
                           timestep_mlp(TIMESTEPS, *weights, backend="cpu"))
        triton_weights = [w.to(TRITON_DEVICE) for w in weights]
        assert timestep_mlp(TIMESTEPS[:0].to(TRITON_DEVICE), *triton_weights, backend="triton").shape == (0, 4)


@pytest.mark.parametrize("backend", ["ref", *KERNEL_BACKENDS])
def test_opcheck(backend):
    t = TIMESTEPS.to(on(backend))
    torch.library.opcheck(torch.ops.blitzdiff.timestep_embedding.default, (t, 9, True, 1.0, 1.0, 10000.0),
                          {"backend": backend})
    weights = mlp_weights(9, 20, 6, torch.float32, on(backend))
    torch.library.opcheck(torch.ops.blitzdiff.timestep_mlp.default, (t, *weights, False, 1.0, 1.0, 1e4),
                          {"backend": backend})


def test_compiles_fullgraph_on_cpu():
    weights = mlp_weights(32, 16, 8, torch.float32)

    def embed(t):
        return timestep_mlp(t * 2, *weights, flip_sin_to_cos=True, backend="cpu").tanh()

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(embed, fullgraph=True)(TIMESTEPS), embed(TIMESTEPS))


BAD_INPUTS = {
    # name: (call, message)
    "timesteps_rank": (lambda: timestep_embedding(TIMESTEPS[None], 8, backend="cpu"), "1-D real tensor"),
    "negative_dim": (lambda: timestep_embedding(TIMESTEPS, -2, backend="cpu"), "dim must be >= 0"),
    "backend": (lambda: timestep_embedding(TIMESTEPS, 8, backend="fast"), "no backend 'fast'"),
    "cuda_on_cpu": (lambda: timestep_embedding(TIMESTEPS, 8, backend="cuda"), "needs tensors on cuda"),
    "w2_shape": (lambda: timestep_mlp(TIMESTEPS, *mlp_weights(8, 6, 4, torch.float32)[:2], torch.ones(4, 5), None),
                 "w2 \\[O, H\\]"),
    "bias_shape": (lambda: timestep_mlp(TIMESTEPS, torch.ones(6, 8), torch.ones(5), torch.ones(4, 6), None),
                   "b1 must have shape"),
    "mixed_dtypes": (lambda: timestep_mlp(TIMESTEPS, torch.ones(6, 8), None, torch.ones(4, 6).double(), None),
                     "w2 is torch.float64"),
    "triton_double": (lambda: timestep_mlp(TIMESTEPS, *mlp_weights(8, 6, 4, torch.float64), backend="triton"),
                      "takes float16, bfloat16, float32"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_mlp_kernels_refuse_grad_and_say_how_to_build(monkeypatch):
    w1, b1, w2, b2 = (torch.nn.Parameter(w) for w in mlp_weights(8, 6, 4, torch.float32))
    timestep_mlp(TIMESTEPS, w1, b1, w2, b2, backend="ref").sum().backward()  # the spec differentiates
    assert w1.grad is not None and torch.isfinite(w1.grad).all()
    with pytest.raises(ValueError, match="not differentiable"):
        timestep_mlp(TIMESTEPS, w1, b1, w2, b2, backend="cpu")
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    with pytest.raises(RuntimeError, match="pip install -e"):
        timestep_embedding(TIMESTEPS, 8, backend="cpu")


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_embedding_and_mlp(backend):
    t = TIMESTEPS.cuda()
    for config in CONFIGS:
        dim, opts = options(config)
        tc = t / 1000.0 if config == "flow" else t
        out = timestep_embedding(tc, dim, **opts, backend=backend)
        exact = exact_embedding(tc.cpu(), dim, **opts).cuda()
        assert_within_budget(out, exact, timestep_embedding_ref(tc, dim, **opts))
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            mlp_check(mlp_weights(320, 1280, 1280, dtype, "cuda"), backend, "sd", t)
            mlp_check(mlp_weights(256, 1152, 1152, dtype, "cuda", bias=False), backend, "dit", t[:2])
            mlp_check(mlp_weights(130, 70, 24, dtype, "cuda"), backend, "odd", torch.arange(19, device="cuda") * 50)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_repeatable_capturable_and_opcheck(backend):
    t = (torch.arange(8, device="cuda") * 100).float()
    weights = mlp_weights(320, 1280, 1280, torch.float16, "cuda")
    with torch.no_grad():
        first = timestep_mlp(t, *weights, flip_sin_to_cos=True, backend=backend)
        for _ in range(10):
            assert torch.equal(timestep_mlp(t, *weights, flip_sin_to_cos=True, backend=backend), first)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = timestep_mlp(t, *weights, flip_sin_to_cos=True, backend=backend)
        t.add_(1.0)  # replay reads the timesteps' memory as it is now
        graph.replay()
        torch.testing.assert_close(captured, timestep_mlp(t, *weights, flip_sin_to_cos=True, backend=backend))
    torch.library.opcheck(torch.ops.blitzdiff.timestep_embedding.default,
                          (t.long(), 9, True, 1.0, 1.0, 10000.0), {"backend": backend})
    assert math.isfinite(timestep_embedding(t, 320, backend="auto").sum().item())


def test_cpu_threads_give_the_same_bits():
    """The C++ kernel splits rows over torch.get_num_threads() threads once each gets 8192 values: the same bits
    for any count (256 x 320 splits over up to 10 threads)."""
    timesteps = torch.linspace(0, 999, 256)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(timestep_embedding(timesteps, 320, flip_sin_to_cos=True, backend="cpu"))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(got, results[0]) for got in results[1:])
    torch.testing.assert_close(results[0], timestep_embedding_ref(timesteps, 320, flip_sin_to_cos=True),
                               rtol=0, atol=2e-6)
