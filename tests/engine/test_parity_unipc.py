"""UniPC against diffusers' own UniPCMultistepScheduler loop: same config, network and noise -> same final sample
(float64), through blitzdiff.sample with the sampler name "unipc": to 1e-5 against diffusers as it ships, and to
1e-10 against diffusers' own code in float64 arithmetic on the same float32 sigma values
(`diffusers_loop(..., float64=True)`), which shows the plan is diffusers' algorithm up to float64 rounding."""

import json

import diffusers
import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.unipc import unipc_schedule

from .parity import diffusers_loop, relative_error, toy_network

STEPS = [1, 2, 3, 4, 5, 7, 10, 25, 50]
SPACINGS = ["linspace", "leading", "trailing"]


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def spaced(config: dict, spacing: str) -> dict:
    return {**config, "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}


def assert_parity(noise, config, steps):
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="unipc", scheduler_config=config)
    stock = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, steps)
    exact = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, steps, float64=True)
    assert relative_error(ours, stock) < 1e-5 and relative_error(ours, exact) < 1e-10


# final_sigmas_type="zero" (the default) makes diffusers return NaN with bh1 or predict_x0=False: parity runs those
# with sigma_min; blitzdiff's limit at sigma 0 is tested in test_unipc_limit.py
SOLVERS = {
    "bh2-2": {},
    "bh2-3": {"solver_order": 3},
    "bh1-3": {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "order1": {"solver_order": 1},
    "eps-bh2-3": {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "eps-bh1-2": {"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_unipc_matches_diffusers(noise, solver, steps, spacing):
    assert_parity(noise, spaced(solver, spacing), steps)


OPTIONS = {
    "disable-corrector": {"disable_corrector": [0, 2, 3, 7], "solver_order": 3},
    "eps-disable-corrector": {"disable_corrector": [0, 2, 3, 7], "solver_order": 3, "predict_x0": False,
                              "final_sigmas_type": "sigma_min"},
    "no-lower-order-final": {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "karras": {"use_karras_sigmas": True, "solver_order": 3},
    "karras-sigma-min": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "karras-range": {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 40.0},
    "exponential": {"use_exponential_sigmas": True, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "v-scaled": {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012},
    "sample": {"prediction_type": "sample", "solver_order": 3},
    "threshold": {"thresholding": True, "sample_max_value": 1.5, "solver_order": 3},
    "zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500, "solver_order": 3},
}


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("config", OPTIONS.values(), ids=OPTIONS.keys())
def test_unipc_options_match_diffusers(noise, config, steps):
    assert_parity(noise, config, steps)


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 25])
@pytest.mark.parametrize("sigmas", ["default", "karras"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_unipc_noise_prediction_of_v_and_x0_networks(noise, prediction_type, sigmas, steps):
    """predict_x0=False on a network that predicts v or x0. The noise-prediction update subtracts two large nearly
    equal terms (alpha_t / alpha_s x and sigma_t (e^h - 1) eps, both ~alpha_t / alpha_s ~ 100 at the first step),
    which amplifies diffusers' float32 host rounding of alpha, sigma and h (and of its eps conversion) to ~1e-4
    relative. So the reference is the same diffusers loop in float64 arithmetic: there, parity is ~1e-13."""
    config = {"prediction_type": prediction_type, "predict_x0": False, "final_sigmas_type": "sigma_min",
              "solver_order": 3, "use_karras_sigmas": sigmas == "karras"}
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="unipc", scheduler_config=config)
    ref = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, steps, float64=True)
    assert relative_error(ours, ref) < 1e-10


def test_unipc_from_a_diffusers_config_file(noise, tmp_path):
    """A scheduler_config.json naming the class selects UniPC without a sampler name."""
    config = {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "solver_order": 3,
              "timestep_spacing": "trailing"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    ours = blitzdiff.sample(toy_network, noise, steps=6, scheduler_config=tmp_path)
    ref = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, 6)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    ],
    ids=["linspace", "karras", "exponential", "leading", "trailing-zero-snr"],
)
@pytest.mark.parametrize("steps", [1, 3, 10, 50])
def test_unipc_schedule_matches_diffusers(config, steps):
    """Timesteps exactly (exponential sigmas truncate them toward zero, Karras rounds); sigmas to float32 rounding
    (diffusers' CPU float32 `** 0.5` differs from a correctly rounded sqrt by one ulp on some entries)."""
    scheduler = diffusers.UniPCMultistepScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    timesteps, sigmas = unipc_schedule(resolve("unipc", config), steps)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    np.testing.assert_allclose(sigmas, scheduler.sigmas.double().numpy(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_plan_shape(order, predict_x0):
    """One evaluation per step; the corrector needs only the last `order` estimates plus the new one (and, for
    noise prediction, the points they were evaluated at)."""
    config = {"solver_order": order, "predict_x0": predict_x0, "final_sigmas_type": "sigma_min"}
    plan = build_plan(resolve("unipc", config), 25)
    assert len(plan.stages) == 25 and not plan.stochastic and plan.integer_timesteps
    assert plan.history == order + 1
    assert plan.stages[0].point is None  # the first evaluation is at the initial noise


@pytest.mark.parametrize("config", [*SOLVERS.values(), *OPTIONS.values()], ids=[*SOLVERS, *OPTIONS])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_unipc_history_is_bounded(config, predict_x0):
    """solver_order + 1 estimates at any number of steps, also for noise prediction (its eps_j are read from the
    kept evaluation points)."""
    config = {**config, "predict_x0": predict_x0}
    if not predict_x0:  # diffusers ignores thresholding there: refused
        config = {**config, "thresholding": False}
    plan = build_plan(resolve("unipc", config), 200)
    assert plan.history == resolve("unipc", config).solver_order + 1 <= 4


@pytest.mark.parametrize(
    "config, match",
    [
        ({"lower_order_final": False}, "lower_order_final"),
        ({"lower_order_final": False, "solver_type": "bh1", "predict_x0": False}, "no finite last step"),
        ({"thresholding": True, "predict_x0": False, "final_sigmas_type": "sigma_min"}, "thresholding"),
        ({"disable_corrector": "0"}, "disable_corrector"),
        ({"timestep_spacing": "leading", "num_train_timesteps": 10}, "repeats a noise level"),
    ],
)
def test_unipc_refuses_what_diffusers_cannot_run(noise, config, match):
    with pytest.raises(ValueError, match=match):
        blitzdiff.sample(toy_network, noise, steps=10, sampler="unipc", scheduler_config=config)
