"""LCM and consistency-model sampling against diffusers' own loops (float64, the re-noising draws lined up per stage),
and the documented path for progressively distilled students: DDIM on a v-prediction config."""

import diffusers
import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.solvers import build_plan

from .parity import diffusers_loop, relative_error, toy_network


def strong_network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """toy_network scaled up, so that x0 estimates leave [-1, 1] and clipping changes the result."""
    return 3.0 * toy_network(x, t)


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def run_both(scheduler_class, sampler, noise, config, steps=None, timesteps=None, fn=toy_network, seeds=None):
    ours = blitzdiff.sample(fn, noise, steps=steps, sampler=sampler, scheduler_config=config, timesteps=timesteps,
                            seeds=seeds)
    ref = diffusers_loop(
        scheduler_class, config, fn, noise, steps,
        seeds=None if seeds is None else torch.as_tensor(seeds, dtype=torch.int64),
        set_timesteps_kwargs=None if timesteps is None else {"timesteps": list(timesteps)},
    )
    return ours, ref


def lcm_both(noise, config, **kwargs):
    return run_both("LCMScheduler", "lcm", noise, config, **kwargs)


def cm_both(noise, config, **kwargs):
    return run_both("CMStochasticIterativeScheduler", "consistency", noise, config, **kwargs)


# ---------------------------------------------------------------- LCM (LCMScheduler)


@pytest.mark.parametrize("original", [50, 25, 100])
def test_lcm_timesteps_match_diffusers(original):
    config = {"original_inference_steps": original}
    for steps in range(1, original + 1):
        plan = build_plan(resolve("lcm", config), steps)
        scheduler = diffusers.LCMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        assert [s.timestep for s in plan.stages] == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 10, 25, 50])
def test_lcm_matches_diffusers(noise, spacing, steps):
    # LCMScheduler ignores timestep_spacing and steps_offset: its schedule is a subset of the distillation schedule
    config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    ours, ref = lcm_both(noise, config, steps=steps)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"clip_sample": True, "clip_sample_range": 1.5},
        {"thresholding": True, "sample_max_value": 1.5, "clip_sample": True},
        {"timestep_scaling": 5.0},
        {"original_inference_steps": 25, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"original_inference_steps": 100, "set_alpha_to_one": False},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    ],
    ids=["v", "sample", "clip", "threshold", "scaling", "orig25-linear", "orig100", "cosine-500", "zero-snr"],
)
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_options_match_diffusers(noise, config, steps):
    ours, ref = lcm_both(noise, config, steps=steps, fn=strong_network)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize("timesteps", [[999, 499], [899, 599, 299, 0], [500], [990, 500, 10], [999, 759, 499, 259]])
def test_lcm_custom_timesteps_match_diffusers(noise, timesteps):
    ours, ref = lcm_both(noise, {}, timesteps=timesteps)
    assert relative_error(ours, ref) < 1e-5


def test_lcm_custom_timesteps_equal_to_the_default_schedule_give_the_same_plan():
    config = resolve("lcm")
    assert build_plan(config, None, timesteps=[999, 759, 499, 259]) == build_plan(config, 4)


def test_lcm_noise_is_lined_up_per_sample(noise):
    ours, ref = lcm_both(noise, {}, steps=4, seeds=[7, 3])
    assert relative_error(ours, ref) < 1e-5
    # the re-noising really is in play: other seeds give another sample, and sample i depends only on its seed
    other = blitzdiff.sample(toy_network, noise, steps=4, sampler="lcm", seeds=[7, 4])
    assert torch.equal(other[0], ours[0]) and relative_error(other[1], ours[1]) > 1e-2


def test_lcm_clipping_changes_the_sample(noise):
    on, ref = lcm_both(noise, {"clip_sample": True}, steps=4, fn=strong_network)
    off = blitzdiff.sample(strong_network, noise, steps=4, sampler="lcm")
    assert relative_error(on, ref) < 1e-5 and relative_error(on, off) > 1e-3


# ---------------------------------------------------------------- consistency models (CMStochasticIterativeScheduler)


@pytest.mark.parametrize("config", [{}, {"num_train_timesteps": 1000, "rho": 5.0}], ids=["default", "1000-rho5"])
def test_consistency_schedule_matches_diffusers(config):
    n = resolve("consistency", config).num_train_timesteps
    for steps in [*range(1, 41), n]:
        plan = build_plan(resolve("consistency", config), steps)
        scheduler = diffusers.CMStochasticIterativeScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        np.testing.assert_allclose([s.timestep for s in plan.stages], scheduler.timesteps.numpy(), rtol=1e-12)
        sigmas = np.array([s.sigma / s.alpha for s in plan.stages])  # diffusers keeps its sigmas in float32
        np.testing.assert_allclose(sigmas, scheduler.sigmas[:-1].numpy(), rtol=1e-7)


@pytest.mark.parametrize("clip_denoised", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 20, 40])
def test_consistency_matches_diffusers(noise, steps, clip_denoised):
    ours, ref = cm_both(noise, {"clip_denoised": clip_denoised}, steps=steps, fn=strong_network)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize("clip_denoised", [True, False])
@pytest.mark.parametrize("timesteps", [[22, 0], [39, 17, 0], [30, 10], [10], [39, 38, 20, 1, 0]])
def test_consistency_custom_timesteps_match_diffusers(noise, timesteps, clip_denoised):
    ours, ref = cm_both(noise, {"clip_denoised": clip_denoised}, timesteps=timesteps, fn=strong_network)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        ({"s_noise": 1.007, "sigma_data": 0.7, "rho": 5.0}, 5),
        ({"sigma_min": 0.01, "sigma_max": 40.0, "clip_denoised": False}, 8),
        ({"num_train_timesteps": 1000}, 25),
        ({"num_train_timesteps": 1000, "clip_denoised": False}, 150),
        ({"num_train_timesteps": 1000}, 1000),
    ],
    ids=["s_noise-sigma_data-rho", "sigma-range", "1000-25", "1000-150", "1000-1000"],
)
def test_consistency_options_match_diffusers(noise, config, steps):
    ours, ref = cm_both(noise, config, steps=steps, fn=strong_network)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize("steps", [2, 5, 40])
def test_consistency_residual_is_diffusers_float32_sigma_min(noise, steps):
    """diffusers holds its sigmas in float32 and re-noises after the final step with std sqrt(float32(sigma_min)^2 -
    sigma_min^2) ~ 7e-7 (a rounding residue; blitzdiff adds none). With a float32-exact sigma_min that residue is 0
    and the two loops agree ten times closer."""
    ours, ref = cm_both(noise, {"sigma_min": float(np.float32(0.002))}, steps=steps, fn=strong_network)
    assert relative_error(ours, ref) < 1e-6


def test_consistency_noise_and_clipping_are_in_play(noise):
    clipped = blitzdiff.sample(strong_network, noise, steps=3, sampler="consistency")
    unclipped = blitzdiff.sample(strong_network, noise, steps=3, sampler="consistency",
                                 scheduler_config={"clip_denoised": False})
    reseeded = blitzdiff.sample(strong_network, noise, steps=3, sampler="consistency", seeds=[0, 5])
    assert relative_error(clipped, unclipped) > 1e-3
    assert torch.equal(reseeded[0], clipped[0]) and relative_error(reseeded[1], clipped[1]) > 1e-2


# ---------------------------------------------------------------- progressively distilled students (DDIM)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
         "set_alpha_to_one": False, "rescale_betas_zero_snr": True},
    ],
    ids=["cosine-clip", "sd-zero-snr"],
)
def test_distilled_student_ddim_matches_diffusers(noise, spacing, steps, config):
    """Salimans & Ho 2022: a v-prediction student distilled to 4 / 8 steps is sampled with deterministic DDIM."""
    config = {"_class_name": "DDIMScheduler", **config, "prediction_type": "v_prediction",
              "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="ddim", scheduler_config=config)
    ref = diffusers_loop("DDIMScheduler", config, toy_network, noise, steps)
    assert relative_error(ours, ref) < 1e-5


# ---------------------------------------------------------------- errors at the boundary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "lcm", "steps": 51}, "original_inference_steps"),
        ({"sampler": "lcm", "steps": 4, "scheduler_config": {"original_inference_steps": 2000}},
         "original_inference_steps"),
        ({"sampler": "lcm", "steps": 3, "timesteps": [999, 499]}, "timesteps were given"),
        ({"sampler": "lcm"}, "steps is required"),
        ({"sampler": "lcm", "timesteps": [499, 999]}, "descending"),
        ({"sampler": "consistency", "timesteps": [40, 0]}, r"\[0, 40\)"),
        ({"sampler": "consistency", "steps": 41}, "num_train_timesteps"),
        ({"sampler": "ddim", "timesteps": [999, 499]}, "does not take"),
    ],
)
def test_bad_arguments_are_value_errors(noise, kwargs, match):
    with pytest.raises(ValueError, match=match):
        blitzdiff.sample(toy_network, noise, **kwargs)
