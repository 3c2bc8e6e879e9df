"""Invariants of the sampling loop and of the public boundary, for every sampler in blitzdiff.SAMPLERS.

- Sync-free (ARCHITECTURE.md contract 3): the loop runs under a dispatch mode that fails on any device -> host read
  (aten._local_scalar_dense, nonzero, is_nonzero), with post-processing and classifier-free guidance too.
- torch.compile(fullgraph=True) captures the whole loop, and the compiled loop computes what the eager one does.
- Per-sample determinism (contract 4): sample i is bitwise the same whatever the batch size and composition.
- Every step count 1..num_train_timesteps builds a finite plan that lands on its final noise level, and the loop
  runs it to finite values (slow sweep).
- Bad input at `blitzdiff.sample` raises ValueError saying what was wrong; config resolution follows diffusers.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blitzdiff
from blitzdiff.engine.config import CLASS_DEFAULTS, SAMPLERS, resolve
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.functional import parameterization, postprocessing
from blitzdiff.engine.noise import seed_tensor
from blitzdiff.engine.sampler import run_plan
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.common import train_alpha_bars

from .analytic import final_level

aten = torch.ops.aten
NAMES = list(SAMPLERS)


def toy(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample and elementwise, from correctly rounded ops only (+, *, /), so an element's value cannot depend
    on where it sits in the batch (SIMD body or scalar tail): [B, ...], [B] (, y [B, ...]) -> [B, ...]."""
    scale = (1.0 + t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))
    out = x / (1.0 + x * x) * scale + 0.1 * x
    return out if y is None else out + 0.05 * y


def loop_parts(sampler, config=None, steps=6, noise=None, guidance_scale=1.0, **options):
    """What blitzdiff.sample builds before its loop: (plan, denoiser, initial state, seeds, postprocess)."""
    resolved = resolve(sampler, config)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) if noise is None else noise
    batch = noise.shape[0]
    plan = build_plan(resolved, steps, **options)
    kind, constants = parameterization(resolved)
    cond = uncond = None
    if guidance_scale != 1.0:
        cond, uncond = {"y": torch.ones_like(noise)}, {"y": torch.zeros_like(noise)}
    denoiser = Denoiser(toy, plan, kind, batch=batch, device=noise.device, cond=cond, uncond=uncond,
                        guidance_scale=guidance_scale, **constants)
    return plan, denoiser, noise * plan.init_scale, seed_tensor(None, batch, noise.device), postprocessing(resolved)


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a device value on the host (what .item(), bool(tensor), nonzero do)."""

    FORBIDDEN = (aten._local_scalar_dense, aten.nonzero, aten.is_nonzero)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FORBIDDEN:
            raise AssertionError(f"host sync in the sampling loop: {func}")
        return func(*args, **(kwargs or {}))


SYNC_CASES = [
    *((name, None, 1.0) for name in NAMES),  # defaults: DDIM / DDPM clip_sample, consistency clip_denoised
    *((name, {"thresholding": True, "clip_sample": False}, 1.0)
      for name in ("ddim", "ddpm", "dpmpp_2m", "dpm_solver", "dpmpp_2m_sde", "unipc", "lcm")),
    ("heun", {"clip_sample": True}, 1.0),
    *((name, None, 4.0) for name in ("ddim", "dpmpp_2m_sde", "heun", "consistency")),  # classifier-free guidance
]


@pytest.mark.parametrize(("sampler", "config", "guidance_scale"), SYNC_CASES,
                         ids=[f"{s}-{'default' if c is None else '+'.join(c)}-cfg{g:g}" for s, c, g in SYNC_CASES])
def test_loop_is_sync_free(sampler, config, guidance_scale):
    plan, denoiser, x, seeds, post = loop_parts(sampler, config, steps=6, guidance_scale=guidance_scale)
    with NoHostSync():
        out = run_plan(plan, denoiser, x, seeds, post)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", [name for name in NAMES if build_plan(resolve(name), 6).stochastic])
def test_loop_is_sync_free_with_the_compiled_noise_kernel(sampler):
    plan, denoiser, x, seeds, post = loop_parts(sampler, steps=6)
    with NoHostSync():
        out = run_plan(plan, denoiser, x, seeds, post, noise_backend="cpu")
    assert torch.isfinite(out).all()


def test_sync_detector_catches_syncs():
    """The control: the mode does fail on .item(), bool(tensor) and nonzero, also from inside the loop."""
    t = torch.ones(3)
    for sync in (lambda: t.sum().item(), lambda: bool(t[0] > 0), lambda: t.nonzero()):
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            sync()
    plan, denoiser, x, seeds, post = loop_parts("dpmpp_2m")
    means = []

    def logging_denoiser(point, k):  # what a progress bar printing the mean would do
        means.append(point.mean().item())
        return denoiser(point, k)

    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        run_plan(plan, logging_denoiser, x, seeds, post)


COMPILE_CASES = [
    ("ddim", 4), ("dpmpp_2m_sde", 4), ("unipc", 4), ("dpmpp_3m", 4), ("dpm_solver", 4), ("heun", 3),
]


@pytest.mark.parametrize(("sampler", "steps"), COMPILE_CASES)
def test_compiled_loop_matches_eager(sampler, steps):
    """The whole loop is one graph (fullgraph=True: a graph break is an error) and computes the eager result to
    1e-6 relative: the state is float64, the noise float32 Box-Muller, whose compiled log / cos may differ from
    eager's by an ulp (3e-8 relative seen). Compile time is printed (pytest -s), never asserted."""
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan, denoiser, x, seeds, post = loop_parts(sampler, steps=steps, noise=noise)

    def loop(x, seeds):
        return run_plan(plan, denoiser, x, seeds, post)

    start = time.perf_counter()
    compiled = torch.compile(loop, fullgraph=True)(x, seeds)
    print(f"{sampler}: {len(plan.stages)} stages compiled in {time.perf_counter() - start:.1f}s")
    eager = loop(x, seeds)
    assert (compiled - eager).abs().max().item() < 1e-6 * eager.abs().max().item()


def plan_fields(plan) -> list[tuple[str, float]]:
    """Every number in a plan, with where it sits."""
    fields = [("init_scale", plan.init_scale), ("output_scale", plan.output_scale)]
    for stage in plan.stages:
        fields += [("timestep", stage.timestep), ("alpha", stage.alpha), ("sigma", stage.sigma)]
        for where, c in (("point", stage.point), ("update", stage.update)):
            if c is not None:
                fields += [(f"{where}.{f}", getattr(c, f)) for f in ("x", "raw", "noise")]
                fields += [(f"{where}.denoised", v) for v in c.denoised]
                fields += [(f"{where}.points", v) for v in c.points]
    return fields


@pytest.mark.parametrize("sampler", NAMES)
def test_plans_hold_python_floats(sampler):
    """Plans are host data of Python floats: a numpy scalar left in a coefficient becomes a traced tensor under
    torch.compile, and `coef != 0.0` in the loop a data-dependent branch (a fullgraph error, see heun above)."""
    plan = build_plan(resolve(sampler), 5)
    bad = sorted({f"{field}: {type(v).__name__}" for field, v in plan_fields(plan) if type(v) is not float})
    assert not bad, bad


def per_seed_noise(seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Initial noise [B, 3, 5, 7] whose row for a seed is the same in every batch (odd sizes: SIMD tails)."""
    rows = [torch.randn(3, 5, 7, dtype=dtype, generator=torch.Generator().manual_seed(10_000 + s)) for s in seeds]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sampler", NAMES)
def test_sample_is_independent_of_its_batch(sampler, dtype):
    results = []
    for seeds in ([5, 6, 7, 8], [7], [100, 7], [7, 100, 3, 9, 11, 12, 13]):
        out = blitzdiff.sample(toy, per_seed_noise(seeds, dtype), steps=7, sampler=sampler, seeds=seeds)
        results.append(out[seeds.index(7)])
    for other in results[1:]:
        assert torch.equal(other, results[0])


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm"])
def test_noise_backends_draw_the_same_noise(sampler):
    """"auto" picks the C++ kernel on CPU: same hash as "ref", Box-Muller log / cos within an ulp or two, so the
    samples agree to float32 rounding (they would differ by O(1) if the kernel drew other noise)."""
    noise = per_seed_noise([3, 4], torch.float32)
    ref, auto = (blitzdiff.sample(toy, noise, steps=8, sampler=sampler, seeds=[3, 4], noise_backend=backend)
                 for backend in ("ref", "auto"))
    assert (auto - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


# Step counts a builder refuses with a ValueError where diffusers would return NaN (a repeated noise level makes
# a zero-length step that a higher-order update divides by) or that the sampler's schedule does not have.
REFUSED = {
    **{name: {1000: "repeat"} for name in ("dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                           "dpmpp_3s", "unipc")},
    "lcm": {n: "exceeds original_inference_steps" for n in range(51, 1001)},
}
SWEEP_CONFIGS = {"consistency": {"num_train_timesteps": 1000}}
LOOP_STEPS = sorted({*range(1, 61), *range(61, 1000, 37), 999, 1000})


def expected_final_level(resolved, plan) -> float:
    """0 (a clean sample), sigma_min for the names that fix final_sigmas_type="sigma_min", and for LCM the level of
    its last output f = c_skip * x + c_out * D (the boundary-condition residue c_skip * sigma of the noisy input)."""
    if resolved.fields.get("final_sigmas_type") == "sigma_min":
        alpha_bar_0 = train_alpha_bars(resolved)[0]
        return math.sqrt((1 - alpha_bar_0) / alpha_bar_0)
    if resolved.class_name == "LCMScheduler":
        last = plan.stages[-1]
        s = last.timestep * resolved.timestep_scaling
        c_skip, c_out = 0.25 / (s * s + 0.25), s / math.sqrt(s * s + 0.25)
        return c_skip * last.sigma / (c_skip * last.alpha + c_out)
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("sampler", NAMES)
def test_every_step_count(sampler):
    """Plans for every N in 1..1000 are finite and land on their final level; the loop runs a dense subset of
    them (all of 1..60, every 37th, 999, 1000) on a [1, 1, 1, 1] sample to finite values."""
    config = resolve(sampler, SWEEP_CONFIGS.get(sampler))
    refused = REFUSED.get(sampler, {})
    x = torch.randn(1, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for n in range(1, config.num_train_timesteps + 1):
        if n in refused:
            with pytest.raises(ValueError, match=refused[n]):
                build_plan(config, n)
            continue
        plan = build_plan(config, n)
        assert all(math.isfinite(v) for _, v in plan_fields(plan)), f"steps={n}: non-finite plan"
        assert final_level(plan) == pytest.approx(expected_final_level(config, plan), rel=1e-6, abs=1e-12), n
        if n in LOOP_STEPS:
            out = blitzdiff.sample(toy, x, steps=n, sampler=sampler, scheduler_config=SWEEP_CONFIGS.get(sampler))
            assert torch.isfinite(out).all(), f"steps={n}: non-finite sample"


PNDM_CONFIG = {  # Stable Diffusion 1.x's scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
NOISE = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
BAD_INPUTS = {
    "unknown-sampler": ({"sampler": "euler_a"}, r"unknown sampler 'euler_a'; valid samplers: ddim, ddpm, euler"),
    "steps-0": ({"steps": 0}, r"steps must be an int >= 1, got 0"),
    "steps-too-many": ({"steps": 1001}, r"steps=1001 exceeds .*num_train_timesteps=1000.*1\.\.1000"),
    "steps-float": ({"steps": 2.5}, r"steps must be an int >= 1, got 2.5"),
    "steps-str": ({"steps": "10"}, r"steps must be an int >= 1, got '10'"),
    "steps-bool": ({"steps": True}, r"steps must be an int >= 1, got True"),
    "cond-batch": ({"cond": {"y": torch.zeros(3, 3)}}, r"cond\['y'\] has shape \(3, 3\); .*batch size of noise, 2"),
    "nan-noise": ({"noise": torch.tensor([[math.nan, 0.0, 0.0], [0.0, 0.0, 0.0]])}, r"noise contains NaN or Inf"),
    "inf-noise": ({"noise": torch.tensor([[math.inf, 0.0, 0.0], [0.0, 0.0, 0.0]])}, r"noise contains NaN or Inf"),
    "noise-no-batch": ({"noise": torch.zeros(3)}, r"noise must be a floating-point tensor \[B, \.\.\.\]"),
    "unknown-field": ({"scheduler_config": {"foo": 1}}, r"unknown scheduler config field\(s\) \['foo'\]"),
    "karras-and-exponential": (
        {"scheduler_config": {"use_karras_sigmas": True, "use_exponential_sigmas": True}},
        r"use_karras_sigmas and use_exponential_sigmas are exclusive",
    ),
    "beta-sigmas": ({"scheduler_config": {"use_beta_sigmas": True}}, r"use_beta_sigmas=True is not supported"),
    "spacing": ({"scheduler_config": {"timestep_spacing": "uniform"}},
                r"timestep_spacing='uniform' is not supported; allowed: 'linspace', 'leading', 'trailing'"),
    "prediction-type": ({"prediction_type": "x0"}, r"prediction_type='x0' is not supported; allowed: 'epsilon'"),
    "guidance-without-uncond": ({"guidance_scale": 3.0, "cond": {"y": torch.zeros(2, 3)}},
                                r"guidance_scale=3.0 needs uncond with the same keys as cond \(\['y'\]\)"),
    "guidance-without-conditioning": ({"guidance_scale": 3.0}, r"guidance_scale=3.0 needs conditioning"),
    "eta-not-taken": ({"sampler": "dpmpp_2m", "eta": 0.5}, r"dpmpp_2m does not take option\(s\) \['eta'\]"),
    "unsupported-class": ({"scheduler_config": PNDM_CONFIG},
                          r"scheduler class 'PNDMScheduler' is not supported; pass sampler= one of ddim"),
    "seeds-count": ({"seeds": [1, 2, 3]}, r"seeds must be an int or a sequence of 2 ints"),
    "noise-backend": ({"noise_backend": "triton"}, r"unknown noise_backend 'triton'; allowed: auto, ref, cpu, cuda"),
    "noise-backend-device": ({"sampler": "ddpm", "noise_backend": "cuda"},
                             r"backend 'cuda' needs seeds on cuda, got cpu"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(case):
    kwargs, message = BAD_INPUTS[case]
    kwargs = {"noise": NOISE, "steps": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        blitzdiff.sample(toy, kwargs.pop("noise"), **kwargs)


def test_foreign_class_with_a_sampler_name_works():
    """PNDM's config with sampler="ddim": PNDM-only fields are dropped (as diffusers' from_config drops them), the
    shared ones kept."""
    config = resolve("ddim", PNDM_CONFIG)
    assert config.class_name == "DDIMScheduler" and "skip_prk_steps" not in config.fields
    assert (config.beta_schedule, config.steps_offset, config.set_alpha_to_one) == ("scaled_linear", 1, False)
    out = blitzdiff.sample(toy, NOISE, steps=5, sampler="ddim", scheduler_config=PNDM_CONFIG)
    assert torch.isfinite(out).all()


def test_in_memory_diffusers_config_keeps_the_other_class_defaults():
    """scheduler.config of a live diffusers scheduler lists the fields its owner never set; another class keeps its
    own defaults for them, as diffusers' from_config does (DDIM's "leading" spacing is not DPM-Solver's)."""
    import diffusers

    ddim = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    expected = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config).config
    fields = resolve("dpmpp_2m", {**ddim.config, "_class_name": "DDIMScheduler"}).fields
    assert fields["timestep_spacing"] == expected["timestep_spacing"] == "linspace"
    assert fields["steps_offset"] == expected["steps_offset"] == 1


def test_ddpm_folder_config_runs_dpm_solver():
    """A DDPM folder's variance_type="fixed_small" is inert for DPM-Solver (diffusers only acts on "learned*"), so
    sampler="dpmpp_2m" on it samples; a learned-variance value is refused (the caller splits those channels)."""
    config = {"_class_name": "DDPMScheduler", "variance_type": "fixed_small", "clip_sample": False}
    assert torch.isfinite(blitzdiff.sample(toy, NOISE, steps=4, sampler="dpmpp_2m", scheduler_config=config)).all()
    with pytest.raises(ValueError, match=r"variance_type='learned_range' is not supported"):
        resolve("dpmpp_2m", {**config, "variance_type": "learned_range"})


def test_class_defaults_are_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    import inspect

    for class_name, ours in CLASS_DEFAULTS.items():
        parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters.values()
        theirs = {p.name: p.default for p in parameters
                  if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        assert dict(ours) == theirs, class_name


def test_config_from_file_and_folder(tmp_path):
    config = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "beta_end": 0.015}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    for source in (tmp_path, tmp_path / "scheduler_config.json", str(tmp_path)):
        resolved = resolve(scheduler_config=source)
        assert resolved.class_name == "EulerDiscreteScheduler" and resolved.name == "euler"
        assert (resolved.timestep_spacing, resolved.beta_end) == ("trailing", 0.015)
    with pytest.raises(ValueError, match="scheduler config not found"):
        resolve(scheduler_config=tmp_path / "missing.json")


def test_class_name_selects_and_sampler_overrides():
    config = {"_class_name": "DPMSolverSinglestepScheduler", "solver_order": 3, "beta_schedule": "scaled_linear"}
    assert resolve(scheduler_config=config).name == "dpmpp_3s"
    overridden = resolve("unipc", config)  # the name wins over _class_name; shared fields carry over
    assert overridden.class_name == "UniPCMultistepScheduler"
    assert (overridden.solver_order, overridden.beta_schedule) == (3, "scaled_linear")
    assert resolve("dpmpp_2m", prediction_type="v_prediction").prediction_type == "v_prediction"
    assert resolve().name == "dpmpp_2m"  # the default sampler


@pytest.mark.parametrize("sampler", NAMES)
def test_every_name_resolves_to_its_class(sampler):
    class_name, fixed = SAMPLERS[sampler]
    config = resolve(sampler)
    assert config.class_name == class_name and config.name == sampler
    assert all(config.fields[k] == v for k, v in fixed.items())
