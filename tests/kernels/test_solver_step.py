"""blitzdiff.kernels.solver_step: the fused guidance + preconditioning + plan update against its spec and the loop.

Two levels. Per call: every backend against `solver_step_ref` on float64 inputs (1e-12), and in float32 / float16 /
bfloat16 within the flash-attention budget (error against a float64 computation at most 2x that of the loop's own
eager ops in that precision, + one ulp). Whole plans: running a plan stage by stage with solver_step gives run_plan's
result (DDIM with and without noise, DPM-Solver++(2M), UniPC-2; guided and not; epsilon and sample prediction).
Triton runs on the GPU where there is one, else under its interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""

import sys

import pytest
import torch

from blitzdiff.engine.config import resolve
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.noise import gaussian
from blitzdiff.engine.plan import Combination
from blitzdiff.engine.sampler import combine, run_plan
from blitzdiff.engine.solvers import build_plan
from blitzdiff.kernels import solver_step, solver_step_ref
from blitzdiff.kernels._backends import choose_backend, triton_interpreted
from blitzdiff.kernels.solver_step import KERNEL_DTYPES

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode

# A guided DPM-Solver++(3M) SDE-like step from a UniPC-style point, with every kind of term present.
COEFS = {"c_skip": 1.25, "c_out": -0.4, "guidance_scale": 4.0, "a": 0.9, "b": (0.35, -0.12, 0.05, -0.01),
         "p": (0.2, -0.07, 0.03, 0.01), "s": 0.05}
# name: which parts are present (the others take their neutral value)
CASES = {
    "everything": {},
    "unguided": {"guided": False},
    "no_skip": {"c_skip": 0.0},  # sample prediction: denoised = c_out * out
    "ddim_like": {"history": 0, "points": 0, "s": 0.0, "own_point": False},
    "zeros_skipped": {"b": (0.35, 0.0, 0.05, 0.0), "p": (0.0, -0.07, 0.0, 0.0), "a": 0.0},
    "d0_unused": {"b": (0.0, 0.5), "history": 1, "points": 0},
}
SHAPES = [(1, 1), (2, 3, 5, 7), (3, 2, 347)]  # 1 element; odd; > 2 CPU chunks of 1024 with a tail
KERNEL_BACKENDS = ["cpu", "triton"]


def on(backend):
    """The device a backend's tests run on here."""
    return {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")


def make_args(shape, dtype, case="everything", device="cpu", seed=0):
    """kwargs for solver_step (with out and x) for one of CASES."""
    opts = {"guided": True, "history": 3, "points": 4, "own_point": True, **CASES[case]}
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=g, dtype=torch.float64).to(device, dtype)

    x = randn(*shape)
    rows = 2 * shape[0] if opts["guided"] else shape[0]
    n_hist, n_points = opts["history"], opts["points"]
    args = {key: opts.get(key, COEFS[key]) for key in ("c_skip", "c_out", "a", "s")}
    args["guidance_scale"] = COEFS["guidance_scale"] if opts["guided"] else 1.0
    args["b"] = opts.get("b", COEFS["b"])[: n_hist + 1]
    args["p"] = opts.get("p", COEFS["p"])[:n_points]
    args.update(out=randn(rows, *shape[1:]), x=x, history=[randn(*shape) for _ in range(n_hist)],
                points=[randn(*shape) for _ in range(n_points)], noise=randn(*shape) if args["s"] else None,
                point=randn(*shape) if opts["own_point"] else None)
    return args


def tensors_as(args, fn):
    """args with fn applied to every tensor (lists included)."""
    def apply(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        return [fn(t) for t in v] if isinstance(v, list) else v
    return {k: apply(v) for k, v in args.items()}


def ref(args):
    keys = ("out", "x", "point", "history", "points", "noise", "c_skip", "c_out", "guidance_scale", "a", "b", "p", "s")
    return solver_step_ref(*(args[k] for k in keys))


def eager(args):
    """The sampling loop's own ops in the inputs' dtype (Denoiser.__call__, then sampler.combine)."""
    out, x = args["out"], args["x"]
    point = x if args["point"] is None else args["point"]
    if out.shape[0] != x.shape[0]:
        u, c = out.chunk(2)
        out = u + args["guidance_scale"] * (c - u)
    if args["c_skip"] != 0.0:
        denoised = torch.add(point * args["c_skip"], out, alpha=args["c_out"])
    else:
        denoised = out * args["c_out"]
    update = Combination(x=args["a"], denoised=args["b"], points=args["p"], noise=args["s"])
    history = [*args["history"][::-1], denoised]  # oldest first, as the loop keeps it
    points = [*args["points"][::-1]]
    x_next = combine(update, x, history, points, None, None, 0) if args["noise"] is None else None
    if x_next is None:  # combine draws its own noise: add the given one as its last term, as combine would
        quiet = Combination(x=update.x, denoised=update.denoised, points=update.points)
        x_next = torch.add(combine(quiet, x, history, points, None, None, 0), args["noise"], alpha=update.noise)
    return denoised, x_next


def max_errors(results, args):
    """[(max |result - exact|, max |exact|)] for denoised and x_next, `exact` in float64 from the same inputs."""
    exact = ref(tensors_as(args, torch.Tensor.double))
    return [((r.double() - e).abs().max().item(), e.abs().max().item()) for r, e in zip(results, exact, strict=True)]


def assert_within_budget(results, args):
    plain = max_errors(eager(args), args)
    for (err, scale), (plain_err, _) in zip(max_errors(results, args), plain, strict=True):
        assert err <= 2 * plain_err + torch.finfo(results[0].dtype).eps * scale, (err, plain_err)


def test_ref_is_the_loops_eager_ops_in_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        for case in CASES:
            args = make_args((2, 3, 5, 7), dtype, case)
            for got, want in zip(ref(args), eager(args), strict=True):
                assert torch.equal(got, want), case


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float64_matches_spec(backend, shape, case):
    args = make_args(shape, torch.float64, case, on(backend))
    for got, want in zip(solver_step(**args, backend=backend), ref(args), strict=True):
        assert got.shape == want.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float32_within_2x_pytorch_error(backend, shape, case):
    args = make_args(shape, torch.float32, case, on(backend))
    assert_within_budget(solver_step(**args, backend=backend), args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_within_2x_pytorch_error(dtype):
    args = make_args((2, 3, 5, 7), dtype, device=TRITON_DEVICE)
    results = solver_step(**args, backend="triton")
    assert all(r.dtype == dtype for r in results)
    assert_within_budget(results, args)


@pytest.mark.parametrize("backend", ["ref", *KERNEL_BACKENDS])
def test_unused_non_finite_terms_never_reach_the_sum(backend):
    # A zero coefficient skips its tensor (as the loop does), so an infinite stale history cannot make NaN.
    args = make_args((2, 3, 5), torch.float32, "zeros_skipped", on(backend))
    args["history"][0].fill_(float("inf"))
    args["points"][0].fill_(float("nan"))
    args["x"][0, 0, 0] = float("inf")  # a = 0
    denoised, x_next = solver_step(**args, backend=backend)
    assert torch.isfinite(x_next).all()
    torch.testing.assert_close(x_next, ref(args)[1])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bitwise_repeatable(backend):
    args = make_args((3, 2, 347), torch.float32, device=on(backend))
    first = solver_step(**args, backend=backend)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(solver_step(**args, backend=backend), first, strict=True))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_channels_last_and_strided_inputs(backend):
    args = make_args((2, 3, 5, 7), torch.float32, device=on(backend))
    views = tensors_as(args, lambda t: t.to(memory_format=torch.channels_last))
    views["x"] = args["x"].transpose(2, 3).contiguous().transpose(2, 3)  # another layout, same values
    assert not views["x"].is_contiguous() and not views["out"].is_contiguous()
    for got, want in zip(solver_step(**views, backend=backend), solver_step(**args, backend=backend), strict=True):
        assert torch.equal(got, want)
        assert got.is_contiguous() or backend == "ref"  # the op's results are contiguous; "ref" is the spec's ops


def test_empty_batch():
    args = make_args((0, 4), torch.float32, "unguided")
    assert all(t.shape == (0, 4) for t in solver_step(**args, backend="cpu"))


def test_auto_picks_the_cpu_kernel_where_it_has_one():
    order = ("cuda", "triton", "cpu")
    assert choose_backend(torch.device("cpu"), torch.float32, KERNEL_DTYPES, order) == "cpu"
    assert choose_backend(torch.device("cpu"), torch.float16, KERNEL_DTYPES, order) == "ref"
    args = make_args((2, 3, 5), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(solver_step(**args, backend="auto"),
                                                 solver_step(**args, backend="cpu"), strict=True))
    args = make_args((2, 3, 5), torch.float16)  # auto falls back to the spec for a dtype no CPU kernel takes
    assert all(torch.equal(a, b) for a, b in zip(solver_step(**args, backend="auto"), ref(args), strict=True))


OPCHECK_KEYS = ("out", "x", "point", "history", "points", "noise", "c_skip", "c_out", "guidance_scale", "a", "b",
                "p", "s")


def opcheck_args(case, dtype=torch.float32, device="cpu"):
    args = make_args((2, 3, 5), dtype, case, device=device)
    return tuple(list(args[k]) if k in ("b", "p") else args[k] for k in OPCHECK_KEYS)


@pytest.mark.parametrize("case", ["everything", "ddim_like", "no_skip"])
@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_opcheck(backend, case):
    torch.library.opcheck(torch.ops.blitzdiff.solver_step.default, opcheck_args(case, device=on(backend)),
                          {"backend": backend})


def test_compiles_fullgraph_on_cpu():
    def stage(out, x, d1, c_out):
        denoised, x_next = solver_step(out * 1.0, x, c_skip=1.1, c_out=c_out, guidance_scale=3.0, a=0.9,
                                       b=(0.2, -0.1), history=[d1], backend="cpu")
        return denoised.sin(), x_next

    compiled = torch.compile(stage, fullgraph=True)
    args = make_args((2, 3, 5), torch.float32)
    for c_out in (-0.4, -0.3):  # scalars that change per stage
        for got, want in zip(compiled(args["out"], args["x"], args["history"][0], c_out),
                             stage(args["out"], args["x"], args["history"][0], c_out), strict=True):
            torch.testing.assert_close(got, want)


def _replace(args, **changes):
    return {**args, **changes}


BAD_INPUTS = {
    # name: (change to valid float32 args, backend, what the message must mention)
    "out_shape": (lambda a: _replace(a, out=a["out"][:3]), "cpu", "out must be"),
    "unguided_scale": (lambda a: _replace(a, out=a["out"][:2]), "cpu", "guidance_scale=4.0 needs"),
    "history_shape": (lambda a: _replace(a, history=[t[:1] for t in a["history"]]), "cpu", r"history\[0\].shape"),
    "point_dtype": (lambda a: _replace(a, point=a["point"].double()), "cpu", "point.dtype"),
    "noise_device": (lambda a: _replace(a, noise=a["noise"].to("meta")), "cpu", "noise is on meta"),
    "b_length": (lambda a: _replace(a, b=a["b"][:2]), "ref", "b holds b_0"),
    "too_many_history": (lambda a: _replace(a, history=a["history"] * 2, b=(1.0,) * 7), "ref", "at most 3"),
    "p_length": (lambda a: _replace(a, p=a["p"][:1]), "ref", "one coefficient per point"),
    "missing_noise": (lambda a: _replace(a, noise=None), "ref", "noise is None but"),
    "integer": (lambda a: tensors_as(a, torch.Tensor.long), "ref", "floating point"),
    "cpu_half": (lambda a: tensors_as(a, torch.Tensor.half), "cpu", "takes float32, float64"),
    "cuda_on_cpu": (lambda a: a, "cuda", "needs tensors on cuda"),
    "backend": (lambda a: a, "fast", "no backend 'fast'; allowed: ref, cpu, cuda, triton, auto"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    change, backend, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        solver_step(**change(make_args((2, 3, 5), torch.float32)), backend=backend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs tensors on cuda, got cpu; the CPU needs TRITON_INTERPRET=1"):
        solver_step(**make_args((2, 3), torch.float32), backend="triton")


def test_ref_differentiates_and_kernels_refuse_grad():
    args = make_args((2, 3), torch.float32, "unguided")
    args["x"].requires_grad_(True)
    solver_step(**args, backend="ref")[1].sum().backward()
    torch.testing.assert_close(args["x"].grad, torch.full_like(args["x"], args["a"]))
    with pytest.raises(ValueError, match="not differentiable"):
        solver_step(**args, backend="cpu")
    with torch.no_grad():
        solver_step(**args, backend="cpu")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    with pytest.raises(RuntimeError, match="pip install -e"):
        solver_step(**make_args((2, 3), torch.float32), backend="cpu")


# --- whole plans, stage by stage ---------------------------------------------------------------------------------

def network(x, t, y):
    """A smooth, nonlinear, timestep- and label-dependent stand-in for a UNet."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.7 * torch.tanh(x) * scale + 0.2 * x.roll(1, dims=-1) + 0.1 * y.to(x.dtype).reshape(scale.shape)


def fused_run(plan, den, x, seeds, backend):
    """run_plan with each stage's guidance, preconditioning and update done by one solver_step call."""
    history, points = [], []  # oldest first, as run_plan keeps them
    depth = plan.history
    for k, stage in enumerate(plan.stages):
        point = x if stage.point is None else combine(stage.point, x, history, points, None, seeds, 2 * k)
        c = den.scalars[k]
        x_in = point if c.c_in == 1.0 else point * c.c_in
        out = den.fn(torch.cat([x_in, x_in]) if den.guided else x_in, den.timesteps[k], **den.cond)
        update = stage.update or Combination(x=0.0)  # no update: only the denoised estimate is used
        assert update.raw == 0.0, "raw terms come with x0 post-processing, which solver_step does not fuse"
        older, pts = history[::-1], [point, *points[::-1]]
        b, p = update.denoised or (0.0,), update.points
        assert not any(b[1 + len(older):]) and not any(p[len(pts):]), "the plan reads history that does not exist"
        b, p = b[: 1 + len(older)], p[: len(pts)]
        noise = gaussian(seeds, 2 * k + 1, x.shape[1:], x.dtype) if update.noise != 0.0 else None
        denoised, x_next = solver_step(
            out, x, c_skip=c.c_skip, c_out=c.c_out, guidance_scale=den.guidance_scale if den.guided else 1.0,
            a=update.x, b=b, history=older[: len(b) - 1], p=p, points=pts[: len(p)], s=update.noise, noise=noise,
            point=None if stage.point is None else point, backend=backend)
        history, points = [*history, denoised][-depth:], [*points, point][-depth:]
        if stage.update is not None:
            x = x_next
    return x * plan.output_scale if plan.output_scale != 1.0 else x


PLANS = {  # name: (sampler, config overrides, builder options, prediction type)
    "ddim": ("ddim", {"clip_sample": False}, {}, "epsilon"),
    "ddim_eta": ("ddim", {"clip_sample": False}, {"eta": 1.0}, "v_prediction"),
    "dpmpp_2m": ("dpmpp_2m", {}, {}, "epsilon"),
    "unipc": ("unipc", {}, {}, "epsilon"),
    "unipc_sample": ("unipc", {}, {}, "sample"),  # c_skip = 0
    # noise prediction reads past points (P_0 .. P_3) and, at order 3, three older estimates
    "unipc3_eps": ("unipc", {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}, {}, "epsilon"),
}


def run_both(name, dtype, guidance, backend, steps=6):
    sampler, overrides, options, prediction = PLANS[name]
    plan = build_plan(resolve(sampler, **overrides), steps, **options)
    batch, shape, device = 2, (2, 3, 6, 6), torch.device(on(backend))
    labels = {"cond": {"y": torch.tensor([3, 7], device=device)},
              "uncond": {"y": torch.tensor([10, 10], device=device)}}
    den = Denoiser(network, plan, prediction, batch=batch, device=device, guidance_scale=guidance, **labels)
    generator = torch.Generator().manual_seed(1)
    x0 = (torch.randn(shape, generator=generator, dtype=torch.float64) * plan.init_scale).to(device)
    seeds = torch.arange(batch, device=device)
    results = {}
    for dt in {dtype, torch.float64}:
        x = x0.to(dt)
        results[dt] = (run_plan(plan, den, x, seeds), fused_run(plan, den, x, seeds, backend))
    return results


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_stage_by_stage_equals_run_plan(backend, name, guidance):
    check_stage_by_stage(backend, name, guidance)


def check_stage_by_stage(backend, name, guidance):
    results = run_both(name, torch.float32, guidance, backend)
    loop64, fused64 = results[torch.float64]
    torch.testing.assert_close(fused64, loop64, rtol=1e-12, atol=1e-12)
    loop32, fused32 = results[torch.float32]
    # float32: within float32 rounding of the loop: error to the float64 run at most 2x the loop's own, + an ulp
    err, loop_err = ((r.double() - loop64).abs().max().item() for r in (fused32, loop32))
    assert err <= 2 * loop_err + torch.finfo(torch.float32).eps * loop64.abs().max().item(), (err, loop_err)


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_within_2x_pytorch_error(backend, dtype, case):
    for shape in [*SHAPES, (8, 4, 64, 64)]:
        args = make_args(shape, dtype, case, device="cuda")
        results = solver_step(**args, backend=backend)
        assert all(r.dtype == dtype and r.device == args["x"].device for r in results)
        if dtype == torch.float64:
            for got, want in zip(results, ref(args), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert_within_budget(results, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bitwise_repeatable_and_auto(backend):
    args = make_args((3, 2, 347), torch.float16, device="cuda")
    first = solver_step(**args, backend=backend)
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(solver_step(**args, backend=backend), first, strict=True))
    chosen = choose_backend(args["x"].device, args["x"].dtype, KERNEL_DTYPES, ("cuda", "triton"))
    assert chosen in GPU_BACKENDS  # the CUDA kernel where built, else Triton
    auto = solver_step(**args, backend="auto")
    assert all(torch.equal(a, b) for a, b in zip(auto, solver_step(**args, backend=chosen), strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_side_stream_and_graph_capture(backend):
    args = make_args((4, 4, 64, 64), torch.float32, device="cuda")
    expected = ref(args)
    solver_step(**args, backend=backend)  # compile / load outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches on torch's current stream, not the default one
        results = solver_step(**args, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = solver_step(**args, backend=backend)
    args["x"].mul_(2.0)  # replay reads the inputs' memory as it is now
    graph.replay()
    for got, want in zip(captured, ref(args), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck(backend):
    torch.library.opcheck(torch.ops.blitzdiff.solver_step.default, opcheck_args("everything", torch.float16, "cuda"),
                          {"backend": backend})


@pytest.mark.cuda
@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_stage_by_stage_equals_run_plan(backend, name):
    check_stage_by_stage(backend, name, 3.0)


@pytest.mark.parametrize("n", [3 * 256 * 1024 + 1000, 2 * 32 * 1024 + 5])
def test_cpu_threads_give_the_same_bits(n):
    """solver_step_cpu splits calls of at least 32 chunks of 1024 per thread over threads, in whole chunks: any count,
    same bits (three threads with a tail; two, just past the threshold)."""
    from blitzdiff._C import solver_step_cpu

    gen = torch.Generator().manual_seed(0)
    out, x, h = (torch.randn(n, generator=gen) for _ in range(3))
    results = []
    for threads in (1, 2, 3, 8):
        denoised, x_next = torch.empty(n), torch.empty(n)
        solver_step_cpu(denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(), x.data_ptr(), n, False, "float32",
                        1.1, -0.2, 1.0, [x.data_ptr(), 0, h.data_ptr()], [0.9, 0.3, 0.1], threads)
        results.append((denoised, x_next))
    want = solver_step_ref(out, x, None, [h], [], None, 1.1, -0.2, 1.0, 0.9, [0.3, 0.1], [], 0.0)
    for got in results:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0], strict=True))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        solver_step_cpu(0, 0, 0, 0, 0, False, "float32", 1.0, 1.0, 1.0, [], [], 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_per_sample_guidance_rows(dtype):
    """guidance_rows: sample i's rows use scale i; rows of 1500 elements change scale inside the kernel's 1024-element
    chunks. Checked against the spec run sample by sample with each number."""
    from blitzdiff._C import solver_step_cpu

    batch, size = 3, 1500
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(2 * batch, size, generator=gen, dtype=dtype)  # [uncond; cond]
    x, h = (torch.randn(batch, size, generator=gen, dtype=dtype) for _ in range(2))
    scales = torch.tensor([2.0, 4.5, -1.0])  # float32, as a Pipeline runtime keeps them
    denoised, x_next = torch.empty_like(x), torch.empty_like(x)
    solver_step_cpu(denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(), x.data_ptr(), x.numel(), True,
                    str(dtype).removeprefix("torch."), 1.1, -0.2, 1.0, [x.data_ptr(), 0, h.data_ptr()],
                    [0.9, 0.3, 0.1], 1, scales.data_ptr(), size)
    for i, scale in enumerate(scales.tolist()):
        rows = torch.stack([out[i], out[batch + i]])
        want = solver_step_ref(rows, x[i:i + 1], None, [h[i:i + 1]], [], None, 1.1, -0.2, scale, 0.9, [0.3, 0.1], [],
                               0.0)
        torch.testing.assert_close(denoised[i:i + 1], want[0])  # to rounding, as test_float64_matches_spec
        torch.testing.assert_close(x_next[i:i + 1], want[1])
    with pytest.raises(ValueError, match=r"row_size must be >= 1 and divide n \(4500\), got 7"):
        solver_step_cpu(denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(), x.data_ptr(), x.numel(), True,
                        "float32", 1.0, 1.0, 1.0, [], [], 1, scales.data_ptr(), 7)


IN_PLACE_UPDATES = {  # name -> (c_skip, the terms' sources, coefficients): the one-pass and the chunked paths
    "one pass: x, D, h": (1.1, ["x", "new", "h"], [0.9, 0.3, 0.1]),
    "chunked: D, x, h": (1.1, ["new", "x", "h"], [0.3, 0.9, 0.1]),
    "chunked: c_skip 0": (0.0, ["x", "new", "h"], [0.9, 0.3, 0.1]),
}


@pytest.mark.parametrize("over", ["x", "point", "h"])
@pytest.mark.parametrize("update", list(IN_PLACE_UPDATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_x_next_over_an_input_gives_the_same_bits(dtype, update, over):
    """The eager loop writes x_next over its state x (PlanRun); the kernel's contract allows x_next to be the very
    buffer of x, the point or a history term: each element is read before it is written. Same bits as into a
    separate buffer, guided, over several chunks and threads."""
    from blitzdiff._C import solver_step_cpu

    n = 2 * 256 * 1024 + 77
    c_skip, sources, coefs = IN_PLACE_UPDATES[update]
    name = str(dtype).removeprefix("torch.")
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(2 * n, generator=gen, dtype=dtype)  # guided: [uncond; cond]
    inputs = {key: torch.randn(n, generator=gen, dtype=dtype) for key in ("x", "point", "h")}
    for threads in (1, 2):
        results = []
        for target in (None, over):
            tensors = {key: value.clone() for key, value in inputs.items()}
            x_next = torch.empty(n, dtype=dtype) if target is None else tensors[target]
            denoised = torch.empty(n, dtype=dtype)
            terms = [0 if source == "new" else tensors[source].data_ptr() for source in sources]
            solver_step_cpu(denoised.data_ptr(), x_next.data_ptr(), out.data_ptr(), tensors["point"].data_ptr(), n,
                            True, name, c_skip, -0.2, 2.5, terms, coefs, threads)
            results.append((denoised, x_next.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_denoised_zero_is_not_stored_and_x_next_is_unchanged(dtype):
    """denoised = 0: the loop's stages whose estimate no later stage reads. x_next has the same bits as with the
    estimate stored (the D_0 term reads it from the chunk's buffer instead), over several chunks and threads."""
    from blitzdiff._C import solver_step_cpu

    n = 2 * 256 * 1024 + 77
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(2 * n, generator=gen, dtype=dtype)  # guided: [uncond; cond]
    x, h = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(2))
    name = str(dtype).removeprefix("torch.")
    terms, coefs = [x.data_ptr(), 0, h.data_ptr()], [0.9, 0.3, 0.1]
    denoised, stored = torch.empty_like(x), torch.empty_like(x)
    solver_step_cpu(denoised.data_ptr(), stored.data_ptr(), out.data_ptr(), x.data_ptr(), n, True, name, 1.1, -0.2,
                    2.5, terms, coefs, 2)
    for threads in (1, 2):
        x_next = torch.full_like(x, float("nan"))
        solver_step_cpu(0, x_next.data_ptr(), out.data_ptr(), x.data_ptr(), n, True, name, 1.1, -0.2, 2.5, terms,
                        coefs, threads)
        assert torch.equal(x_next, stored)
    want = solver_step_ref(out.view(2, n), x[None], None, [h[None]], [], None, 1.1, -0.2, 2.5, 0.9, [0.3, 0.1], [],
                           0.0)
    torch.testing.assert_close(stored[None], want[1])
    with pytest.raises(ValueError, match="x_next, out and point must be non-null"):
        solver_step_cpu(0, 0, out.data_ptr(), x.data_ptr(), n, True, name, 1.1, -0.2, 2.5, terms, coefs, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guidance", ["none", "number", "rows"])
def test_cpu_prepared_stages_equal_solver_step_cpu(dtype, guidance):
    """A SolverStepRun (the eager loop's per-run kernel) called through solver_step_stage gives solver_step_cpu's bits
    for each fused stage of its plan (its scalars and coefficients), and the spec's values to rounding; stages of
    2 threads' worth of chunks, with a tail."""
    from blitzdiff._C import SolverStepPlan, SolverStepRun, solver_step_cpu, solver_step_stage

    batch, size = 2, 40 * 1024 + 3
    gen = torch.Generator().manual_seed(3)
    guided = guidance != "none"
    out = torch.randn(2 * batch if guided else batch, size, generator=gen, dtype=dtype)
    x, h = (torch.randn(batch, size, generator=gen, dtype=dtype) for _ in range(2))
    scales = torch.tensor([2.0, -1.5])  # float32, one per sample
    rows, row_size = (scales.data_ptr(), size) if guidance == "rows" else (0, 0)
    number = 3.0 if guidance == "number" else 1.0
    name = str(dtype).removeprefix("torch.")
    stages = [None, (1.1, -0.2, [0.9, 0.3, 0.1]), (0.0, 0.7, [0.5])]  # stage 2: sample prediction, D_0 alone
    run = SolverStepRun(SolverStepPlan(stages), x.numel(), name, guided, number, rows, row_size, 2)
    for k, terms in ((1, [x.data_ptr(), 0, h.data_ptr()]), (2, [0])):
        c_skip, c_out, coefs = stages[k]
        got, want = (torch.empty_like(x), torch.empty_like(x)), (torch.empty_like(x), torch.empty_like(x))
        solver_step_stage(run, k, got[0].data_ptr(), got[1].data_ptr(), out.data_ptr(), x.data_ptr(), *terms)
        solver_step_cpu(want[0].data_ptr(), want[1].data_ptr(), out.data_ptr(), x.data_ptr(), x.numel(), guided, name,
                        c_skip, c_out, number, terms, coefs, 1, rows, row_size)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        for i in range(batch):  # the spec, sample by sample with its scale
            sample = torch.stack([out[i], out[batch + i]]) if guided else out[i:i + 1]
            scale = scales[i].item() if guidance == "rows" else number
            b, history = ([coefs[1], coefs[2]], [h[i:i + 1]]) if k == 1 else ([coefs[0]], [])
            spec = solver_step_ref(sample, x[i:i + 1], None, history, [], None, c_skip, c_out, scale,
                                   coefs[0] if k == 1 else 0.0, b, [], 0.0)
            torch.testing.assert_close(got[0][i:i + 1], spec[0])
            torch.testing.assert_close(got[1][i:i + 1], spec[1])


def test_cpu_prepared_stage_refuses_bad_calls():
    """Each wrong call of the prepared kernel says what was wrong, and writes nothing."""
    from blitzdiff._C import SolverStepPlan, SolverStepRun, solver_step_stage

    x, out, x_next = torch.randn(8), torch.randn(8), torch.zeros(8)
    plan = SolverStepPlan([None, (1.0, -0.5, [0.9, 0.1])])
    run = SolverStepRun(plan, 8, "float32", False, 1.0, 0, 0, 1)
    pointers = (x_next.data_ptr(), out.data_ptr(), x.data_ptr())
    bad = {
        "stage 0 is not a fused stage of a 2-stage plan": (run, 0, 0, *pointers, x.data_ptr(), 0),
        "stage 2 is not a fused stage": (run, 2, 0, *pointers, x.data_ptr(), 0),
        "stage 1 takes 2 terms, got 1": (run, 1, 0, *pointers, x.data_ptr()),
        "x_next, out and point must be non-null": (run, 1, 0, 0, *pointers[1:], x.data_ptr(), 0),
        "run must be a SolverStepRun, got int": (0, 1, 0, *pointers, x.data_ptr(), 0),
        "run must be a SolverStepRun, got blitzdiff._C.SolverStepPlan": (plan, 1, 0, *pointers, x.data_ptr(), 0),
        "at most 10 term pointers, got 5 arguments": (run, 1, 0, *pointers[:2]),
        "can't convert negative int": (run, -1, 0, *pointers, x.data_ptr(), 0),
        "an integer is required": (run, 1, 0, *pointers, 1.5, 0),
    }
    for message, args in bad.items():
        with pytest.raises((ValueError, TypeError, OverflowError), match=message):
            solver_step_stage(*args)
    assert torch.equal(x_next, torch.zeros(8))
    for message, args in {
        "dtype must be float32 or float64, got 'float16'": (plan, 8, "float16", False, 1.0, 0, 0, 1),
        "threads must be >= 1, got 0": (plan, 8, "float32", False, 1.0, 0, 0, 0),
        r"row_size must be >= 1 and divide n \(8\), got 3": (plan, 8, "float32", True, 1.0, x.data_ptr(), 3, 1),
        "n must be >= 0, got -1": (plan, -1, "float32", False, 1.0, 0, 0, 1),
    }.items():
        with pytest.raises(ValueError, match=message):
            SolverStepRun(*args)
    with pytest.raises(ValueError, match="at most 10 terms a stage, got 11"):
        SolverStepPlan([(1.0, 1.0, [0.1] * 11)])
    with pytest.raises(ValueError, match="at most 10 terms a point, got 11"):
        SolverStepPlan([None], [[0.1] * 11])
    with pytest.raises(ValueError, match=r"points must be empty or one entry per stage \(2\), got 1"):
        SolverStepPlan([None, None], [[0.5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [0, 1, 3, 10])
def test_cpu_prepared_points_equal_combine(dtype, count):
    """solver_point_stage (a stage's evaluation point by the kernel) against the loop's `combine` on the same terms:
    float64 to 1e-12, float32 within 2x combine's own float32 error to a float64 evaluation plus an ulp; on 1 and 2
    threads (the same bits), over 2 threads' worth of chunks with a tail."""
    from blitzdiff._C import SolverStepPlan, SolverStepRun, solver_point_stage

    gen = torch.Generator().manual_seed(count)
    n = 70 * 1024 + 5
    tensors = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(count)]
    coefs = [0.9, -0.35, 0.12, 0.05, -0.01, 0.3, 0.2, -0.07, 0.03, 0.01][:count]
    plan = SolverStepPlan([None, None], [None, coefs])
    name = str(dtype).removeprefix("torch.")
    terms = [t.to(dtype) for t in tensors]
    got = []
    for threads in (1, 2):
        run = SolverStepRun(plan, n, name, False, 1.0, 0, 0, threads)
        point = torch.full((n,), float("nan"), dtype=dtype)
        solver_point_stage(run, 1, point.data_ptr(), *(t.data_ptr() for t in terms))
        got.append(point)
    assert torch.equal(got[0], got[1])

    def combined(ts):  # the loop's combine with these terms as x, D_0, D_1, ...
        c = Combination(x=coefs[0], denoised=tuple(coefs[1:])) if count else Combination(x=0.0)
        like = ts[0] if count else torch.zeros(n, dtype=dtype)
        return combine(c, like, list(reversed(ts[1:])), [], None, torch.zeros(1, dtype=torch.int64), 0)

    exact = combined(tensors)
    if dtype == torch.float64:
        torch.testing.assert_close(got[0], exact, rtol=1e-12, atol=1e-12)
    else:
        err, ref_err = ((r.double() - exact).abs().max().item() for r in (got[0], combined(terms)))
        assert err <= 2 * ref_err + torch.finfo(torch.float32).eps * exact.abs().max().item(), (err, ref_err)


def test_cpu_prepared_point_refuses_bad_calls():
    """Each wrong call of the prepared point kernel says what was wrong, and writes nothing."""
    from blitzdiff._C import SolverStepPlan, SolverStepRun, solver_point_stage

    x, h, point = torch.randn(8), torch.randn(8), torch.zeros(8)
    plan = SolverStepPlan([None, (1.0, -0.5, [0.9, 0.1])], [[0.5, 0.5], None])
    run = SolverStepRun(plan, 8, "float32", False, 1.0, 0, 0, 1)
    bad = {
        "stage 1 has no fused point in a 2-stage plan": (run, 1, point.data_ptr(), x.data_ptr(), h.data_ptr()),
        "stage 2 has no fused point": (run, 2, point.data_ptr(), x.data_ptr(), h.data_ptr()),
        "stage 0's point takes 2 terms, got 1": (run, 0, point.data_ptr(), x.data_ptr()),
        "point and terms must be non-null": (run, 0, point.data_ptr(), x.data_ptr(), 0),
        "run must be a SolverStepRun, got blitzdiff._C.SolverStepPlan": (plan, 0, point.data_ptr(), x.data_ptr(),
                                                                         h.data_ptr()),
        "solver_point_stage takes 3 leading arguments": (run, 0),
    }
    for message, args in bad.items():
        with pytest.raises((ValueError, TypeError), match=message):
            solver_point_stage(*args)
    assert torch.equal(point, torch.zeros(8))
    with pytest.raises(ValueError, match="stage 0 has no fused point"):  # a plan made without points
        solver_point_stage(SolverStepRun(SolverStepPlan([None]), 8, "float32", False, 1.0, 0, 0, 1), 0,
                           point.data_ptr())
