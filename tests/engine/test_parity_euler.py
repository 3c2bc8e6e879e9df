"""Euler, Euler ancestral and Heun against diffusers' own loop: same config, network and noise -> same final sample,
same timesteps at the same number of network evaluations.

diffusers' Euler and Euler-ancestral steps round the sample to float32 ("upcast"), and all three hold their sigmas as
0-dim float32 tensors, so in ill-conditioned cases (a jump from sigma ~ 4096 or ~ 157 down to ~ 1e-2, or Heun's
(D2 - D1) / sigma_next with a tiny sigma_next) diffusers' own float32 rounding alone moves its result by more than
1e-5. Each case is therefore also run through `diffusers_loop(..., float64=True)`: diffusers' unchanged step code with
the same float32 sigma / timestep / init_noise_sigma values, but float64 arithmetic. blitzdiff must match that to
float64 rounding, and stock diffusers to 1e-5 or to within twice diffusers' own float32 error, whichever is larger.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.schedules import vp_from_ve
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.euler import schedule

from .parity import diffusers_loop, relative_error, toy_network

STEPS = [1, 2, 3, 5, 7, 10, 25, 50]
SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "leading-offset0": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
}
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
           "heun": "HeunDiscreteScheduler"}
V_ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
OPTIONS = {
    "euler": {
        "karras": {"use_karras_sigmas": True},
        "exponential": {"use_exponential_sigmas": True},
        "karras-range": {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 100.0},
        "exponential-range": {"use_exponential_sigmas": True, "sigma_min": 0.002, "sigma_max": 60.0},
        "log_linear": {"interpolation_type": "log_linear"},
        "log_linear-karras": {"interpolation_type": "log_linear", "use_karras_sigmas": True},
        "final-sigma_min": {"final_sigmas_type": "sigma_min"},
        "continuous-v": {"prediction_type": "v_prediction", "timestep_type": "continuous", **SCALED_LINEAR},
        "continuous-eps": {"timestep_type": "continuous"},  # diffusers keeps discrete timesteps unless v_prediction
        "sample": {"prediction_type": "sample"},
        "v-zero-snr": V_ZERO_SNR,
        "v-zero-snr-karras": {**V_ZERO_SNR, "use_karras_sigmas": True},
        "cosine": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
    },
    "euler_ancestral": {
        "v": {"prediction_type": "v_prediction", **SCALED_LINEAR},
        "v-zero-snr": V_ZERO_SNR,
        "cosine": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
    },
    "heun": {
        "karras": {"use_karras_sigmas": True},
        "exponential": {"use_exponential_sigmas": True},
        "v": {"prediction_type": "v_prediction", **SCALED_LINEAR},
        "sample": {"prediction_type": "sample"},
        "clip": {"clip_sample": True, "clip_sample_range": 0.5},
        "clip-v-karras": {"clip_sample": True, "prediction_type": "v_prediction", "use_karras_sigmas": True},
    },
}
CASES = [pytest.param(name, config, id=f"{name}-{option}") for name in OPTIONS for option, config in
         OPTIONS[name].items()]
DEFAULTS = [pytest.param(name, {}, id=f"{name}-default") for name in CLASSES]
OPTION_STEPS = [1, 2, 3, 10, 50]


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def recording(calls: list[torch.Tensor]):
    """toy_network that records the timesteps it receives (one entry per network evaluation)."""

    def fn(x, t):
        calls.append(t.clone())
        return toy_network(x, t)

    return fn


def assert_parity(name: str, config: dict, steps: int, noise: torch.Tensor, seeds: torch.Tensor | None = None):
    ours_calls, stock_calls, exact_calls = [], [], []
    ours = blitzdiff.sample(recording(ours_calls), noise, steps=steps, sampler=name, scheduler_config=config,
                            seeds=seeds)
    stock = diffusers_loop(CLASSES[name], config, recording(stock_calls), noise, steps, seeds=seeds)
    exact = diffusers_loop(CLASSES[name], config, recording(exact_calls), noise, steps, seeds=seeds, float64=True)
    # the same number of network evaluations, at exactly the same (float32) timesteps
    assert len(ours_calls) == len(stock_calls) == len(exact_calls)
    assert torch.equal(torch.stack(ours_calls), torch.stack(stock_calls))
    assert torch.equal(torch.stack(exact_calls), torch.stack(stock_calls))
    assert relative_error(ours, exact) < 1e-10
    assert relative_error(ours, stock) < max(1e-5, 2 * relative_error(stock, exact))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", CLASSES)
def test_matches_diffusers(noise, name, spacing, steps):
    assert_parity(name, SPACINGS[spacing], steps, noise)


@pytest.mark.parametrize("steps", OPTION_STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_options_match_diffusers(noise, name, options, spacing, steps):
    assert_parity(name, {**options, **SPACINGS[spacing]}, steps, noise)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_default_euler_matches_diffusers(noise, steps):
    """blitzdiff.sample(sampler="euler") with no config at all is diffusers' default EulerDiscreteScheduler."""
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="euler")
    stock = diffusers_loop("EulerDiscreteScheduler", {}, toy_network, noise, steps)
    assert relative_error(ours, stock) < 1e-5


@pytest.mark.parametrize("seeds", [[0, 1], [7, 123456789]])
def test_euler_ancestral_noise_lines_up(noise, seeds):
    """Per-sample seeds reach the same noise in both loops; a sample does not depend on its batch neighbours."""
    seeds = torch.tensor(seeds)
    assert_parity("euler_ancestral", {}, 10, noise, seeds)
    alone = blitzdiff.sample(toy_network, noise[1:], steps=10, sampler="euler_ancestral", seeds=seeds[1:])
    batched = blitzdiff.sample(toy_network, noise, steps=10, sampler="euler_ancestral", seeds=seeds)
    assert torch.equal(alone[0], batched[1])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("name", "options"), DEFAULTS + CASES)
def test_schedule_and_init_noise_sigma(name, options, spacing):
    """Timesteps and sigmas are diffusers' float32 values; init_scale is alpha_0 * init_noise_sigma, which is
    sigma_max for linspace / trailing but sqrt(sigma_max^2 + 1) for leading spacing."""
    config = {**options, **SPACINGS[spacing]}
    scheduler = getattr(diffusers, CLASSES[name]).from_config(config)
    scheduler.set_timesteps(7)
    timesteps, sigmas = schedule(resolve(name, config), 7)
    plan = build_plan(resolve(name, config), 7)
    if name == "heun":  # diffusers repeats every timestep / sigma but the first (and the final sigma) for stage 2
        assert torch.equal(scheduler.timesteps[::2].double(), torch.from_numpy(timesteps))
        assert torch.equal(torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]).double(), torch.from_numpy(sigmas))
    else:
        assert torch.equal(scheduler.timesteps.double(), torch.from_numpy(timesteps))
        assert torch.equal(scheduler.sigmas.double(), torch.from_numpy(sigmas))
    assert plan.init_scale == vp_from_ve(sigmas[0])[0] * float(scheduler.init_noise_sigma)
    assert not plan.integer_timesteps


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_stages(steps):
    """2 * steps - 1 evaluations: a predictor point (state and the newest denoised) and a two-term corrector per
    step, then a plain Euler step onto sigma = 0 (the state becomes the denoised estimate)."""
    plan = build_plan(resolve("heun"), steps)
    assert len(plan.stages) == 2 * steps - 1
    for first, second in zip(plan.stages[0:-1:2], plan.stages[1::2], strict=True):
        assert first.point is None and first.update is None
        assert len(second.point.denoised) == 1 and len(second.update.denoised) == 2
    assert plan.stages[-1].update.x == 0.0 and plan.stages[-1].update.denoised == (1.0,)
    assert plan.output_scale == 1.0


def test_euler_ancestral_rejects_sample_prediction(noise):
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        blitzdiff.sample(toy_network, noise, steps=5, sampler="euler_ancestral", prediction_type="sample")
    with pytest.raises(NotImplementedError):  # diffusers cannot run it either
        diffusers_loop("EulerAncestralDiscreteScheduler", {"prediction_type": "sample"}, toy_network, noise, 5)


def test_sigma_max_beyond_training_is_refused(noise):
    config = {"use_karras_sigmas": True, "sigma_max": 1000.0}
    with pytest.raises(ValueError, match="first timestep"):
        blitzdiff.sample(toy_network, noise, steps=10, sampler="euler", scheduler_config=config)
    with pytest.raises(IndexError):  # diffusers starts at the repeated timestep's second entry and runs off the end
        diffusers_loop("EulerDiscreteScheduler", config, toy_network, noise, 10)


@pytest.mark.parametrize("field", ["sigma_min", "sigma_max"])
def test_non_positive_sigma_bounds_are_refused(noise, field):
    config = {"use_exponential_sigmas": True, field: 0.0}
    with pytest.raises(ValueError, match=f"{field} must be a positive number"):
        blitzdiff.sample(toy_network, noise, steps=10, sampler="euler", scheduler_config=config)
