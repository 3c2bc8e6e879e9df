"""UniPC's last step into sigma = 0 where diffusers returns NaN (solver_type="bh1", predict_x0=False): blitzdiff's
update there is the limit of diffusers' update as the final sigma goes to 0 (unipc._uni_bh).

The limit is checked against an independent reference, diffusers' own scheduler with its final sigma set to a small
eps > 0, where its update is finite: the gap to blitzdiff closes in proportion to eps (first order, the size of the
sigma_next / sigma and e^-h terms the limit drops). The plan's coefficients converge the same way. On the analytic
problem these samplers converge at order 3 like the default bh2 (test_convergence.py, cases "unipc-*-zero").
"""

import diffusers
import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.plan import Combination
from blitzdiff.engine.solvers import unipc as unipc_module

from .parity import diffusers_loop, relative_error, toy_network

CONFIGS = {
    "bh1": {"solver_type": "bh1"},
    "bh1-order3-karras": {"solver_type": "bh1", "solver_order": 3, "use_karras_sigmas": True},
    "eps-bh2": {"predict_x0": False},
    "eps-bh1-trailing": {"predict_x0": False, "solver_type": "bh1", "timestep_spacing": "trailing"},
}
EPSILONS = (1e-5, 1e-7, 1e-9)  # final VE sigmas standing in for 0


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def assert_first_order(gaps: list[float]) -> None:
    """gap(eps) = C * eps + o(eps) with one C for every eps in EPSILONS: the limit at eps = 0 is the one reached."""
    rates = np.array(gaps) / np.array(EPSILONS)
    assert rates.max() < 1.1 * rates.min(), f"gaps {gaps} for final sigmas {EPSILONS}"


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_diffusers_returns_nan_at_sigma_zero(noise, config):
    """The deviation the limit fixes (README, "Where blitzdiff deliberately differs"): if diffusers ever returns a
    finite sample here, these configs belong in test_parity_unipc.py instead."""
    ours = blitzdiff.sample(toy_network, noise, steps=5, sampler="unipc", scheduler_config=config)
    stock = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, 5)
    assert torch.isfinite(ours).all() and torch.isnan(stock).all()


@pytest.mark.parametrize("steps", [1, 2, 5, 25])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_limit_of_diffusers_as_the_final_sigma_goes_to_zero(noise, monkeypatch, config, steps):
    """diffusers' own loop (float64 arithmetic) with its final sigma 0 replaced by eps: finite there, and within
    C * eps of blitzdiff's sample at sigma 0 (below 2e-8 relative at eps = 1e-9)."""
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="unipc", scheduler_config=config)
    scheduler_class = diffusers.UniPCMultistepScheduler
    set_timesteps = scheduler_class.set_timesteps
    gaps = []
    for eps in EPSILONS:

        def set_timesteps_ending_at_eps(self, *args, final_sigma=eps, **kwargs):
            set_timesteps(self, *args, **kwargs)
            assert self.sigmas[-1] == 0
            self.sigmas[-1] = final_sigma

        monkeypatch.setattr(scheduler_class, "set_timesteps", set_timesteps_ending_at_eps)
        near = diffusers_loop("UniPCMultistepScheduler", config, toy_network, noise, steps, float64=True)
        gaps.append(relative_error(ours, near))
    assert_first_order(gaps)


def coefficients(c: Combination, width: int) -> np.ndarray:
    """x, the denoised weights and the point weights of c, each history padded to `width`."""
    pad = (0.0,) * width
    return np.array([c.x, c.raw, c.noise, *(c.denoised + pad)[:width], *(c.points + pad)[:width]])


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_plan_coefficients_converge_to_the_limit(monkeypatch, config, steps):
    """The plan built on the same schedule with its final sigma 0 replaced by eps (the general B(h) update of
    _uni_bh) against the plan at sigma 0 (its limit branch): the last update's coefficients are within C * eps; every
    other stage is the same."""
    resolved = resolve("unipc", config)
    limit = unipc_module.unipc(resolved, steps)  # the builder itself: build_plan caches by (config, steps)
    schedule = unipc_module.unipc_schedule
    gaps = []
    for eps in EPSILONS:

        def schedule_ending_at_eps(*args, final_sigma=eps):
            timesteps, sigmas = schedule(*args)
            assert sigmas[-1] == 0
            return timesteps, np.concatenate([sigmas[:-1], [final_sigma]])

        monkeypatch.setattr(unipc_module, "unipc_schedule", schedule_ending_at_eps)
        near = unipc_module.unipc(resolved, steps)
        assert near.stages[:-1] == limit.stages[:-1]
        assert near.stages[-1].point == limit.stages[-1].point
        width = resolved.solver_order + 1
        gap = coefficients(near.stages[-1].update, width) - coefficients(limit.stages[-1].update, width)
        gaps.append(np.abs(gap).max())
    assert_first_order(gaps)
