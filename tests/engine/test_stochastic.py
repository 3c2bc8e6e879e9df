"""Stochastic samplers produce the data distribution on Gaussian data, with per-sample seeded noise.

Data x0 ~ N(mu, s^2 I) in 4 dimensions and its exact network (tests/engine/analytic.py). For Gaussian data every
stage's denoiser is affine in the state, so a plan's output is exactly Gaussian and its law can be computed on the
host (analytic.plan_moments: a symbolic run of the plan over the initial and per-stage noises). Two checks per
sampler, which together say that the samples have the right distribution:

1. The discretized sampler's exact law converges to N(mu, s^2): at N_CONVERGED steps its mean and variance are
   within ALLOWANCE (relative to s and s^2) of the data's. This is the sampler's weak (distribution) error, which
   for ancestral samplers driven by the posterior mean is O(1/N) with a large constant (variance -21% at 50 steps,
   -1.5% at 1000 for DDPM, DDIM eta=1 and Euler ancestral alike: they are the same sampler here).
2. The samples blitzdiff draws follow that law: 16000 values sampled in one batch at N_SAMPLE steps have the exact
   law's mean and variance within 4.5 standard errors (mean: 4.5 / sqrt(n) in units of the law's std; variance:
   4.5 * sqrt(2 / n) relative). This catches wrong noise scales, reused or correlated noise streams and loop bugs.

dpmpp_3m_sde uses k-diffusion's sign on its third-order term, not diffusers' (see solvers/dpm_multistep.py): with
diffusers' -0.5 the variance was +23% at 100 steps and +13% at 250; with +0.5 it is +0.7% and -0.03%.
"""

from __future__ import annotations

import math

import pytest
import torch

import blitzdiff
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.common import train_alpha_bars

from .analytic import AnalyticNetwork, ConsistencyNetwork, consistency_affine, gaussian, plan_moments, posterior_affine

MEAN = (0.3, -0.2, 0.5, 0.0)
STD = 0.5
DATA = gaussian(MEAN, STD)
BATCH = 4000  # x 4 dims: n = 16000 values (below torch's parallel grain: no thread wake-ups)
SE_LIMIT = 4.5

SDE_DPMSOLVER = {  # the noise-prediction SDE, second order (its final_sigmas_type must be sigma_min)
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
}

# case -> (sampler, scheduler_config, options, N_SAMPLE, N_CONVERGED, ALLOWANCE)
CASES = {
    "ddpm": ("ddpm", {"clip_sample": False}, {}, 20, 1000, 0.02),
    "ddim-eta1": ("ddim", {"clip_sample": False}, {"eta": 1.0}, 20, 1000, 0.02),
    "euler_ancestral": ("euler_ancestral", {"timestep_spacing": "trailing"}, {}, 20, 1000, 0.02),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, {}, 20, 250, 0.01),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, {}, 20, 250, 0.01),
    "sde-dpmsolver": (None, SDE_DPMSOLVER, {}, 20, 250, 0.01),
    # the exact consistency function: exact for any N up to sigma_min^2 / s^2 = 1.6e-5 of variance
    "consistency": ("consistency", {"clip_denoised": False}, {}, 4, 40, 1e-4),
}


def problem(case: str):
    sampler, config, options, n_sample, n_converged, allowance = CASES[case]
    resolved = blitzdiff.resolve(sampler, config)
    if resolved.class_name == "CMStochasticIterativeScheduler":
        network = ConsistencyNetwork(MEAN, STD, resolved.sigma_min, resolved.sigma_data)
    else:
        network = AnalyticNetwork(DATA, train_alpha_bars(resolved))
    return resolved, network


def exact_law(case: str, steps: int) -> tuple[float, float]:
    """(mean per unit of mu, variance) of one output coordinate of the plan, computed on the host."""
    sampler, config, options, *_ = CASES[case]
    resolved, _ = problem(case)
    plan = build_plan(resolved, steps, **options)
    if resolved.class_name == "CMStochasticIterativeScheduler":
        affine = [consistency_affine(s.alpha, s.sigma, STD, resolved.sigma_min) for s in plan.stages]
    else:
        affine = [posterior_affine(s.alpha, s.sigma, STD) for s in plan.stages]
    out = plan_moments(plan, affine)
    return out.const, out.variance


def draw(case: str, noise: torch.Tensor, seeds, steps: int | None = None) -> torch.Tensor:
    sampler, config, options, n_sample, *_ = CASES[case]
    _, network = problem(case)
    return blitzdiff.sample(network, noise, steps=steps or n_sample, sampler=sampler, scheduler_config=config,
                            seeds=seeds, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_exact_law_converges_to_the_data(case):
    *_, n_converged, allowance = CASES[case]
    mean_per_mu, variance = exact_law(case, n_converged)
    assert abs(mean_per_mu - 1.0) * max(abs(m) for m in MEAN) / STD < allowance
    assert abs(variance / STD**2 - 1.0) < allowance, f"variance ratio {variance / STD**2:.4f} at {n_converged} steps"


@pytest.mark.parametrize("case", list(CASES))
def test_samples_follow_the_exact_law(case):
    noise = torch.randn(BATCH, len(MEAN), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = draw(case, noise, seeds=1000)
    assert torch.isfinite(out).all()
    mean_per_mu, variance = exact_law(case, CASES[case][3])
    z = (out - mean_per_mu * torch.tensor(MEAN, dtype=torch.float64)) / math.sqrt(variance)  # ~ N(0, 1) each
    n = z.numel()
    assert abs(z.mean().item()) < SE_LIMIT / math.sqrt(n), f"mean off by {z.mean().item() * math.sqrt(n):.1f} SE"
    var_ratio = (z**2).mean().item()
    assert abs(var_ratio - 1) < SE_LIMIT * math.sqrt(2 / n), f"variance ratio {var_ratio:.4f}"


@pytest.mark.parametrize("case", list(CASES))
def test_seeds(case):
    """The same seeds give bitwise the same samples; other seeds (same initial noise) give different ones."""
    noise = torch.randn(8, len(MEAN), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = draw(case, noise, seeds=[3, 1, 4, 1, 5, 9, 2, 6])
    again = draw(case, noise, seeds=[3, 1, 4, 1, 5, 9, 2, 6])
    assert torch.equal(first, again)
    other = draw(case, noise, seeds=[30, 10, 40, 11, 50, 90, 20, 60])
    assert (first != other).all(), "a stochastic sampler must inject seed-dependent noise into every sample"
    # equal seeds and equal initial noise give the same sample, whatever its position in the batch
    twins = draw(case, noise[[0, 0]], seeds=[7, 7])
    assert torch.equal(twins[0], twins[1])
