"""DDIM and DDPM against diffusers' own loop: same config, network and noise -> same final sample (float64)."""

import pytest
import torch

import blitzdiff

from .parity import diffusers_loop, relative_error, toy_network

STEPS = [1, 2, 3, 5, 7, 10, 25, 50]
SPACINGS = ["linspace", "leading", "trailing"]


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(noise, spacing, steps, eta):
    config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0, "clip_sample": False}
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="ddim", scheduler_config=config, eta=eta)
    ref = diffusers_loop("DDIMScheduler", config, toy_network, noise, steps, step_kwargs={"eta": eta})
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {"clip_sample": True},
        {"thresholding": True, "sample_max_value": 1.5, "clip_sample": False},
        {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"prediction_type": "sample", "set_alpha_to_one": False},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
    ],
    ids=["clip", "threshold", "v-scaled", "sample-no-alpha-one", "zero-snr", "cosine"],
)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_ddim_options_match_diffusers(noise, config, steps):
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="ddim", scheduler_config=config, eta=0.3)
    ref = diffusers_loop("DDIMScheduler", config, toy_network, noise, steps, step_kwargs={"eta": 0.3})
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_matches_diffusers(noise, spacing, steps, variance_type):
    config = {"timestep_spacing": spacing, "variance_type": variance_type, "clip_sample": spacing != "trailing"}
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="ddpm", scheduler_config=config)
    ref = diffusers_loop("DDPMScheduler", config, toy_network, noise, steps)
    assert relative_error(ours, ref) < 1e-5
