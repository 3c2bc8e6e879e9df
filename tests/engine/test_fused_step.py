"""The loop's fused stages (blitzdiff.engine.fused_step): step_backend="cpu" against the unfused loop ("ref").

Every sampler, guided and not (a number, and one scale per sample), epsilon / v / sample prediction: float64 within
1e-12 relative of the unfused loop, float32 within the unfused loop's own float32 error (to a float64 run) times 2
plus an ulp. Also: stages that must fuse do (a test where nothing fused would compare the loop with itself), the
fallbacks (post-processing, a half-precision network output, a channels-last state) give the unfused result, the
loop stays sync-free and batch-invariant, and the runtime fuses where its loop runs in Python only.
"""

import re

import pytest
import torch

import blitzdiff
from blitzdiff.engine import fused_step as fused_step_module
from blitzdiff.engine.config import resolve
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.functional import parameterization, postprocessing
from blitzdiff.engine.fused_step import fused_stages, resolve_step_backend
from blitzdiff.engine.noise import seed_tensor
from blitzdiff.engine.plan import Combination, Plan, Stage
from blitzdiff.engine.sampler import PlanRun, run_plan
from blitzdiff.engine.solvers import build_plan

from .test_invariants import NoHostSync, loop_parts

NAMES = list(blitzdiff.SAMPLERS)
NO_CLIP = {"clip_sample": False, "clip_denoised": False}  # x0 post-processing is not fused: off, so stages fuse
# Samplers whose every stage has an update (all fuse); the others also have stages that only evaluate (Heun's
# first, the singlestep solvers' intermediate ones) or, for UniPC, a last stage with more terms than fit.
ALL_FUSE = {"ddim", "ddpm", "euler", "euler_ancestral", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "lcm", "consistency"}


def network(x, t, y):
    """A smooth, nonlinear, timestep- and label-dependent stand-in for a UNet."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.7 * torch.tanh(x) * scale + 0.2 * x.roll(1, dims=-1) + 0.1 * y.to(x.dtype).reshape(scale.shape)


def parts(name, guidance, prediction=None, dtype=torch.float64, fn=network, steps=6):
    overrides = dict(NO_CLIP) if prediction is None else {**NO_CLIP, "prediction_type": prediction}
    config = resolve(name, overrides)
    plan = build_plan(config, steps)
    kind, constants = parameterization(config)
    scale = torch.tensor([2.0, 4.5]) if guidance == "rows" else guidance
    denoiser = Denoiser(fn, plan, kind, batch=2, device=torch.device("cpu"), cond={"y": torch.tensor([3, 7])},
                        uncond={"y": torch.tensor([10, 10])}, guidance_scale=scale, **constants)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * plan.init_scale
    return plan, denoiser, x.to(dtype), seed_tensor(3, 2, x.device), postprocessing(config)


def both(name, guidance, prediction=None, dtype=torch.float64):
    plan, denoiser, x, seeds, post = parts(name, guidance, prediction, dtype)
    ref = run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref")
    fused = run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    return ref, fused


CASES = [(name, guidance, None) for name in NAMES for guidance in (1.0, 3.0, "rows")]
CASES += [(name, 3.0, prediction) for name in ("ddim", "dpmpp_2m", "unipc", "euler")
          for prediction in ("v_prediction", "sample")]


@pytest.mark.parametrize(("name", "guidance", "prediction"), CASES)
def test_fused_loop_equals_the_unfused_loop(name, guidance, prediction):
    ref64, fused64 = both(name, guidance, prediction)
    torch.testing.assert_close(fused64, ref64, rtol=1e-12, atol=1e-12)
    ref32, fused32 = both(name, guidance, prediction, torch.float32)
    err, ref_err = ((r.double() - ref64).abs().max().item() for r in (fused32, ref32))
    assert err <= 2 * ref_err + torch.finfo(torch.float32).eps * ref64.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("name", NAMES)
def test_stages_fuse(name):
    """The equality above is not vacuous: every stage with an update fuses (all of them, for most samplers)."""
    plan, denoiser, x, seeds, post = parts(name, 3.0)
    fused = PlanRun(plan, denoiser, x, seeds, post, step_backend="cpu").fused
    assert fused == fused_stages(plan, denoiser, post)
    with_update = [k for k, s in enumerate(plan.stages) if s.update is not None]
    assert {k for k, f in enumerate(fused) if f is not None} <= set(with_update)
    assert sum(f is not None for f in fused) >= (len(with_update) if name in ALL_FUSE else 1)


POINTED = ["heun", "dpm_solver_singlestep", "dpmpp_2s", "dpmpp_3s", "unipc"]  # samplers with point combinations


@pytest.mark.parametrize("name", POINTED)
def test_points_are_computed_by_the_kernel(name, monkeypatch):
    """Every point combination of these samplers fuses, and a fused run computes each by the kernel (so the equality
    with the unfused loop above covers the fused points)."""
    from blitzdiff.engine import sampler

    plan, denoiser, x, seeds, post = parts(name, 3.0)
    calls, original = [], fused_step_module.run_point
    monkeypatch.setattr(sampler, "run_point", lambda step, k, *args: calls.append(k) or original(step, k, *args))
    run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    assert calls == [k for k, s in enumerate(plan.stages) if s.point is not None] != []


def test_a_noise_term_in_a_point_is_drawn_as_the_unfused_loop_draws_it():
    """No shipped sampler draws noise for a point: a hand-made plan whose stage 1 point adds noise (stream 2)."""
    level = [(0.3, 0.954), (0.6, 0.8)]  # (alpha, sigma) per stage
    stages = (Stage(900.0, *level[0], update=Combination(x=0.9, denoised=(0.1,))),
              Stage(500.0, *level[1], point=Combination(x=0.95, noise=0.2), update=Combination(x=0.8, denoised=(0.2,))))
    plan = Plan(stages)
    denoiser = Denoiser(network, plan, "epsilon", batch=2, device=torch.device("cpu"), cond={"y": torch.tensor([3, 7])})
    x, seeds = torch.randn(2, 3, 4, 4, dtype=torch.float64), seed_tensor(0, 2, torch.device("cpu"))
    assert fused_step_module.fused_plan(plan, denoiser).points[1].noise
    fused = run_plan(plan, denoiser, x, seeds, noise_backend="cpu", step_backend="cpu")
    torch.testing.assert_close(fused, run_plan(plan, denoiser, x, seeds, noise_backend="cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fused, run_plan(plan, denoiser, x, seed_tensor(1, 2, torch.device("cpu")),
                                              noise_backend="cpu", step_backend="cpu"))


def poisoned_estimate_is_read(plan, denoiser, x, seeds, post, k):
    """Whether the unfused loop's output depends on stage k's denoised estimate after stage k: replaced by NaN there,
    the output turns non-finite only if a later stage reads it (combine never multiplies a zero coefficient)."""
    run = PlanRun(plan, denoiser, x, seeds, post, "cpu", step_backend="ref")
    for m in range(len(plan.stages)):
        run.stage(m)
        if m == k:
            run.history = [*run.history[:-1], torch.full_like(x, float("nan"))]
    return not torch.isfinite(run.output()).all()


@pytest.mark.parametrize("name", NAMES)
def test_only_estimates_a_later_stage_reads_are_stored(name):
    """A fused stage writes its denoised estimate only where a later stage reads it (never, for first-order samplers),
    as the unfused loop shows by poisoning each estimate in turn."""
    plan, denoiser, x, seeds, post = parts(name, 3.0)
    fused = fused_stages(plan, denoiser, post)
    read = [poisoned_estimate_is_read(plan, denoiser, x, seeds, post, k) for k in range(len(plan.stages))]
    assert [f.store for f in fused if f is not None] == [r for r, f in zip(read, fused, strict=True) if f is not None]
    if name in ("ddim", "euler", "lcm"):
        assert not any(read)
    if name in ("dpmpp_2m", "unipc", "heun"):
        assert any(read)

def test_an_estimate_a_later_point_reads_is_stored():
    """No shipped sampler fuses a stage whose estimate a later *point* reads (their points come after stages without
    an update): a hand-made plan where stage 1's point reads D_0, and stage 2's update reads D_1."""
    level = [(0.3, 0.954), (0.6, 0.8), (0.9, 0.436)]  # (alpha, sigma) per stage
    stages = (Stage(900.0, *level[0], update=Combination(x=0.9, denoised=(0.1,))),
              Stage(500.0, *level[1], point=Combination(x=1.0, denoised=(0.2,)),
                    update=Combination(x=0.8, denoised=(0.2,))),
              Stage(100.0, *level[2], update=Combination(x=0.5, denoised=(0.3, 0.2))))
    plan = Plan(stages)
    denoiser = Denoiser(network, plan, "epsilon", batch=2, device=torch.device("cpu"), cond={"y": torch.tensor([3, 7])})
    x, seeds = torch.randn(2, 3, 4, 4, dtype=torch.float64), seed_tensor(0, 2, torch.device("cpu"))
    assert [f.store for f in fused_stages(plan, denoiser, None)] == [True, True, False]
    torch.testing.assert_close(run_plan(plan, denoiser, x, seeds, step_backend="cpu"),
                               run_plan(plan, denoiser, x, seeds, step_backend="ref"), rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("reads", ["update", "point"])
def test_an_earlier_point_read_alone_keeps_the_histories(reads):
    """A fused loop keeps no histories where no stage reads an earlier estimate or point (DDIM, Euler, ...). No
    shipped sampler reads an earlier point without an earlier estimate: hand-made plans whose stage 2 reads P_1 alone,
    in its update (points[1]) or in its point (points[0] there: the point of the stage before)."""
    level = [(0.3, 0.954), (0.6, 0.8), (0.9, 0.436)]  # (alpha, sigma) per stage
    late = {"update": Combination(x=0.5, denoised=(0.3,), points=(0.0, 0.25))} if reads == "update" else \
        {"point": Combination(x=0.7, points=(0.3,)), "update": Combination(x=0.5, denoised=(0.3,))}
    stages = (Stage(900.0, *level[0], update=Combination(x=0.9, denoised=(0.1,))),
              Stage(500.0, *level[1], update=Combination(x=0.8, denoised=(0.2,))),
              Stage(100.0, *level[2], **late))
    plan = Plan(stages)
    denoiser = Denoiser(network, plan, "epsilon", batch=2, device=torch.device("cpu"), cond={"y": torch.tensor([3, 7])})
    x, seeds = torch.randn(2, 3, 4, 4, dtype=torch.float64), seed_tensor(0, 2, torch.device("cpu"))
    assert not any(f.store for f in fused_stages(plan, denoiser, None))  # no estimate is read: points alone
    torch.testing.assert_close(run_plan(plan, denoiser, x, seeds, step_backend="cpu"),
                               run_plan(plan, denoiser, x, seeds, step_backend="ref"), rtol=1e-12, atol=1e-12)


def test_post_processing_runs_unfused():
    plan, denoiser, x, seeds, _ = parts("ddim", 1.0)
    post = postprocessing(resolve("ddim"))  # clip_sample: between the network and the update
    run = PlanRun(plan, denoiser, x, seeds, post, step_backend="cpu")
    assert run.fused == [None] * len(plan.stages)
    assert torch.equal(run_plan(plan, denoiser, x, seeds, post, step_backend="cpu"),
                       run_plan(plan, denoiser, x, seeds, post, step_backend="ref"))


def test_a_half_precision_network_output_runs_unfused():
    """A float16 output for a float32 state: the kernel would read it as float32, so the stage falls back."""
    half = lambda x, t, y: network(x, t, y).half()  # noqa: E731
    plan, denoiser, x, seeds, post = parts("dpmpp_2m", 3.0, dtype=torch.float32)
    denoiser.fn = half
    assert all(f is not None for f in fused_stages(plan, denoiser, post))
    assert torch.equal(run_plan(plan, denoiser, x, seeds, post, step_backend="cpu"),
                       run_plan(plan, denoiser, x, seeds, post, step_backend="ref"))


def test_a_channels_last_state_gives_the_same_samples():
    """The first stage (a channels-last x, so not contiguous) falls back; the rest fuse."""
    plan, denoiser, x, seeds, post = parts("euler_ancestral", 3.0)
    x = x.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    torch.testing.assert_close(run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu"),
                               run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_a_channels_last_output_midway_gives_the_same_samples(name):
    """One stage's network output is channels-last and float32 (the state is float64): that stage runs unfused, and
    its estimate (x0 predicted: the output scaled) keeps the layout, so the fused stages after it, which read it, must
    know the loop's tensors are no longer plain and check them."""
    plan, denoiser, x, seeds, post = parts(name, 3.0, "sample")
    odd = int(plan.stages[2].timestep)
    states = []

    def fn(x, t, y):
        out = network(x, t, y)
        return out.float().contiguous(memory_format=torch.channels_last) if int(t[0]) == odd else out

    denoiser.fn = fn
    run = PlanRun(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    for k in range(len(plan.stages)):
        run.stage(k)
        states.append(all(t is None or t.is_contiguous() for t in run.history))
    assert not all(states)  # the test is not vacuous: a non-contiguous estimate reached the later stages
    torch.testing.assert_close(run.output(), run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc"])
def test_a_channels_last_network_output_still_fuses(name):
    """A convolution network with channels-last weights (blitzdiff.load's default on the CPU) returns channels-last:
    every stage still runs the kernel (on a contiguous copy of the output), and the samples are the unfused ones."""
    plan, denoiser, x, seeds, post = parts(name, 3.0)
    denoiser.fn = lambda x, t, y: network(x, t, y).contiguous(memory_format=torch.channels_last)  # noqa: E731
    run = PlanRun(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    calls = []
    run.fused = [f and f._replace(kernel=counted(f.kernel, calls)) for f in run.fused]  # not the plan's memo
    for k in range(len(plan.stages)):
        run.stage(k)
    fusable = sum(f is not None for f in run.fused)  # unipc's last stage has no update to fuse
    assert fusable >= len(plan.stages) - 1 and len(calls) == fusable
    assert run.output().is_contiguous()
    torch.testing.assert_close(run.output(), run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)


def counted(kernel, calls):
    def call(*args):
        calls.append(1)
        return kernel(*args)
    return call


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m_sde", "heun", "unipc", "consistency"])
def test_fused_loop_is_sync_free(name):
    plan, denoiser, x, seeds, post = loop_parts(name, NO_CLIP, steps=6, guidance_scale=4.0)
    with NoHostSync():
        out = run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_3m_sde"])
def test_fused_samples_are_independent_of_their_batch(name):
    plan, denoiser, x, seeds, post = parts(name, 1.0, dtype=torch.float32)
    alone = [run_plan(plan, Denoiser(lambda x, t, y: network(x, t, y), plan, "epsilon", batch=1,
                                     device=x.device, cond={"y": torch.tensor([y])}), x[i:i + 1], seeds[i:i + 1],
                      post, "cpu", step_backend="cpu") for i, y in enumerate((3, 7))]
    together = run_plan(plan, Denoiser(network, plan, "epsilon", batch=2, device=x.device,
                                       cond={"y": torch.tensor([3, 7])}), x, seeds, post, "cpu", step_backend="cpu")
    assert torch.equal(together, torch.cat(alone))


def test_step_backend_is_checked():
    cpu = torch.device("cpu")
    assert resolve_step_backend("auto", cpu, torch.float32) == "cpu"
    assert resolve_step_backend("auto", cpu, torch.float16) == "ref"
    assert resolve_step_backend("auto", torch.device("meta"), torch.float32) == "ref"
    with pytest.raises(ValueError, match=r"unknown step_backend 'fused'; allowed: auto, ref, cpu"):
        resolve_step_backend("fused", cpu, torch.float32)
    with pytest.raises(ValueError, match=r"step_backend 'cpu' takes float32 or float64 CPU tensors, got "
                                         r"torch.bfloat16"):
        blitzdiff.sample(lambda x, t: x, torch.randn(1, 2, 2, 2, dtype=torch.bfloat16), steps=2, sampler="euler",
                         step_backend="cpu")


def test_a_network_of_the_wrong_shape_is_named():
    plan, denoiser, x, seeds, post = parts("dpmpp_2m", 3.0)
    denoiser.fn = lambda x, t, y: x[:, :2]
    for backend in ("ref", "cpu"):
        with pytest.raises(ValueError, match=r"the network returned shape \(4, 2, 6, 5\) for input \(4, 3, 6, 5\)"):
            run_plan(plan, denoiser, x, seeds, post, step_backend=backend)


def test_functional_sample_defaults_to_fused_on_cpu():
    """blitzdiff.sample's default ("auto") fuses on CPU, and equals step_backend="ref" to rounding."""
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = {b: blitzdiff.sample(lambda x, t: torch.tanh(x), noise, steps=5, sampler="dpmpp_2m", step_backend=b)
            for b in ("auto", "cpu", "ref")}
    assert torch.equal(runs["auto"], runs["cpu"])
    assert not torch.equal(runs["cpu"], runs["ref"])  # a different computation (rounding), so "auto" is the fused one
    torch.testing.assert_close(runs["cpu"], runs["ref"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("scale", "kernel_guides"), [(torch.tensor([2.0, 4.5]), True), (torch.tensor(3.0), True),
                                                      (torch.tensor([2.0, 4.5], dtype=torch.float64), False)])
def test_tensor_guidance_scales_are_applied_by_the_kernel(scale, kernel_guides):
    """A float32 CPU scale (per sample, or 0-d) is read by the kernel: the Denoiser's guidance ops never run; another
    dtype falls back to them. The samples equal the unfused loop's either way."""
    plan, denoiser, x, seeds, post = parts("dpmpp_2m", scale)
    expected = run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref")
    calls = []
    guide = denoiser.guide
    denoiser.guide = lambda out: calls.append(out.shape) or guide(out)
    got = run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == (0 if kernel_guides else len(plan.stages))


@pytest.mark.parametrize(("name", "guidance"),
                         [("dpmpp_2m", 1.0), ("dpmpp_2m", 3.0), ("ddim", torch.tensor([2.0, 3.0]))])
def test_a_compiled_loop_updates_each_stage_in_one_inductor_kernel(name, guidance):
    """Where the loop is traced (compile_loop) the stages keep the plain ops and inductor fuses them: between two
    network GEMMs (extern calls) one generated kernel does a stage's guidance, preconditioning and update and the
    next network input; guided, one more kernel builds the first [x; x] input."""
    from torch._inductor.utils import run_and_get_code

    config = resolve(name, NO_CLIP)
    plan = build_plan(config, 3)
    kind, constants = parameterization(config)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 4

    def gemm_network(x, t, y):  # x [B', 4, 4, 4]: one matmul, as a network's layers are to inductor
        return (x.reshape(-1, 16) @ weight.to(x.dtype)).reshape(x.shape) + y[:, None, None, None]

    def loop(x, seeds):
        y = torch.ones(x.shape[0])
        denoiser = Denoiser(gemm_network, plan, kind, batch=x.shape[0], device=x.device, cond={"y": y},
                            uncond={"y": -y}, guidance_scale=guidance, **constants)
        return run_plan(plan, denoiser, x, seeds, postprocessing(config), "ref", step_backend="ref")

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    seeds = seed_tensor(0, 2, x.device)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(loop, fullgraph=True, dynamic=False), x, seeds)
    source = "\n".join(code)
    kernels = re.findall(r"^\s+cpp_fused_\w+\(", source, re.MULTILINE)
    assert len(re.findall(r"extern_kernels\.\w+\(", source)) == len(plan.stages)  # the network's GEMMs
    guided = not (isinstance(guidance, float) and guidance == 1.0)
    assert len(kernels) == len(plan.stages) + guided
    # float32 both: the compiled loop within twice the eager loop's own error to a float64 run, plus an ulp (inductor
    # reorders the sums; a fixed tolerance failed for some inputs: the multistep plan amplifies rounding)
    exact = loop(x.double(), seeds)
    err, eager_err = ((r.double() - exact).abs().max().item() for r in (out, loop(x, seeds)))
    assert err <= 2 * eager_err + torch.finfo(torch.float32).eps * exact.abs().max().item(), (err, eager_err)


def test_seeds_on_another_device_than_the_state_are_named():
    """The noise lands on the seeds' device, and a fused stage passes its pointer to a CPU kernel: refused up front."""
    plan, denoiser, x, seeds, post = parts("euler_ancestral", 1.0)
    for backend in ("ref", "cpu"):
        with pytest.raises(ValueError, match=r"seeds are on meta but the state x is on cpu; put both on one device"):
            run_plan(plan, denoiser, x, seeds.to("meta"), post, step_backend=backend)


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 1), ()])
def test_seeds_of_another_batch_than_the_state_are_named(shape):
    """One seed per sample: a seed tensor of another length would have the kernels draw for rows the state does not
    have (or, broadcast, give every sample one noise), so the loop refuses it before the first stage."""
    plan, denoiser, x, seeds, post = parts("euler_ancestral", 1.0)
    wrong = torch.zeros(shape, dtype=torch.int64)
    for backend in ("ref", "cpu"):
        with pytest.raises(ValueError, match=re.escape(f"seeds must hold one seed per sample, shape (2,) for the "
                                                       f"state x of shape (2, 3, 6, 5), got {shape}")):
            run_plan(plan, denoiser, x, wrong, post, "cpu", step_backend=backend)


def run_stages(plan, denoiser, x, seeds, post):
    """(the fused run's output, the data pointers of its states after each stage)."""
    run = PlanRun(plan, denoiser, x, seeds, post, "cpu", step_backend="cpu")
    pointers = []
    for k in range(len(plan.stages)):
        run.stage(k)
        pointers.append(run.x.data_ptr())
    return run.output(), pointers


@pytest.mark.parametrize("name", ["euler", "ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_a_run_updates_its_state_in_place(name):
    """A fused stage writes its x_next over x once x is a buffer of the run's own (after stage 0) that nothing else
    references, which holds where no stage reads an earlier point or the points are not x (UniPC's are its
    corrector's combinations): one buffer for the whole run (UniPC's stage 0 has no update), and the unfused loop's
    samples."""
    plan, denoiser, x, seeds, post = parts(name, 3.0, steps=8)
    out, pointers = run_stages(plan, denoiser, x, seeds, post)
    written = pointers[1:] if name == "unipc" else pointers
    assert written == [written[0]] * len(written) and x.data_ptr() not in written
    torch.testing.assert_close(out, run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)


def test_a_state_remembered_as_a_point_is_never_written():
    """Where a later stage reads an earlier point and the point is x (DPM-Solver's noise-prediction updates), x is
    kept as that point: every stage writes a new state, and the samples are the unfused loop's (writing x over its
    remembered point fails this: 120 off)."""
    plan, denoiser, x, seeds, post = parts("dpm_solver", 3.0, steps=8)
    out, pointers = run_stages(plan, denoiser, x, seeds, post)
    assert all(state != previous for previous, state in zip(pointers, pointers[1:], strict=False))
    torch.testing.assert_close(out, run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)


KEEPERS = {  # how a network may keep what it was given: each must keep the buffer from being written again
    "the tensor": lambda x: x,
    "a view": lambda x: x.view(-1),
    "a slice": lambda x: x[:1],
    "a numpy array": lambda x: x.numpy(),
    "a DLPack capsule": torch.utils.dlpack.to_dlpack,
    "a tensor sharing its storage": lambda x: torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, x.shape),
    "an autograd graph": lambda x: saved_by_autograd(x),
}


def saved_by_autograd(x):
    """x * w with w requiring grad: the graph's node holds x itself (C++), not its Python object."""
    with torch.enable_grad():
        return x * torch.ones((), dtype=x.dtype, requires_grad=True)


@pytest.mark.parametrize("keep", list(KEEPERS))
@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_a_state_the_network_kept_is_never_written(name, keep):
    """A network that keeps its inputs (or views, arrays or capsules of their memory) finds them unchanged after the
    run, and the run's samples are the unfused loop's."""
    kept, copies = [], []

    def keeping(x, t, y):
        kept.append(KEEPERS[keep](x))
        copies.append(x.clone())
        return network(x, t, y)

    plan, denoiser, x, seeds, post = parts(name, 1.0, fn=keeping, steps=8)
    out, pointers = run_stages(plan, denoiser, x, seeds, post)
    assert len(set(pointers)) == len(pointers)  # nothing recycled
    for held, copy in zip(kept, copies, strict=True):
        held = torch.utils.dlpack.from_dlpack(held) if keep == "a DLPack capsule" else held
        held = torch.from_numpy(held) if keep == "a numpy array" else held
        held = held.grad_fn._saved_self if keep == "an autograd graph" else held
        assert torch.equal(held.reshape(-1)[:held.numel()], copy.reshape(-1)[:held.numel()])
    torch.testing.assert_close(out, run_plan(plan, denoiser, x, seeds, post, "cpu", step_backend="ref"),
                               rtol=1e-12, atol=1e-12)
