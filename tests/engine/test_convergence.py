"""Every deterministic sampler converges to the exact probability-flow ODE solution at its theoretical order.

Problems (tests/engine/analytic.py): 2-D Gaussian data (closed-form ODE solution) and a two-component Gaussian
mixture (float64 RK4 reference), sampled through `blitzdiff.sample` with the exact network behind diffusers' UNet
interface, for step counts N over a decade; the order is the least-squares slope of log(max |error|) against
log(N) over N >= 40 (the asymptotic range; N = 10..30 only shows the approach), and must be within ORDER_TOLERANCE
of the theory.

Choices that make the slope the solver's order and not an artifact of the schedule:
- Training schedule: `trained_betas` uniform in log-SNR (analytic.uniform_log_snr_betas, sigma 0.005..80). On
  diffusers' "linear" betas the last step of a t-uniform grid (t = T/N - 1 down to 0) has a log-SNR length
  ~ log(T/N) / 2 that does not shrink like 1/N; its error, ~ sigma_last^2 ~ 1/N, bends the slopes of the higher
  order solvers (dpmpp_2m there: local slopes from -0.3 to 2.1 over N = 10..250, a fitted order of 1.6).
- Final step to sigma_min, never to 0: final_sigmas_type="sigma_min" (Euler, DPM-Solver, UniPC), set_alpha_to_one
  =False (DDIM); the reference is the exact ODE solution at that same sigma. A final step to sigma = 0 is the
  first-order jump x = D(x), whose error does not vanish with N. Heun has no such option: its last step is always
  that jump, so its reference is the exact jump from the exact state, D(x_exact(sigma_last), sigma_last); what is
  measured is the ODE solve down to sigma_last.
- The same exact grid start t = T - 1 for every N: "trailing" spacing with N dividing T = 1000 (integer timesteps,
  so the network reads the exact training level; Euler / Heun with Karras sigmas exercise float timesteps). The
  singlestep DPM solvers only space as linspace(0, T - 1, N + 1): they run with T = 961 and N dividing 960, so their
  intermediate points sit exactly at 1/3 and 2/3 of each third-order step (a rounded grid breaks third order).
- Where each plan lands (sigma_min or 0) is read off the plan itself (analytic.final_level); a level below
  ZERO_LEVEL is 0 up to rounding (a noise-prediction update into sigma 0 cancels the state's noise against that of
  the evaluation points only to ~1e-10).
- UniPC also runs into sigma 0 (cases "unipc-*-zero"), where diffusers returns NaN with bh1 and noise prediction
  and blitzdiff takes the limit of the update (test_unipc_limit.py): like Heun, against the exact jump.

Known deviation from the textbook orders, mirrored from diffusers for parity: the multistep third-order update
(dpmpp_3m, dpm_solver with solver_order=3; also in the dpm-solver reference code and k-diffusion) weights the
second divided difference D2 = h^2 D''/2 by phi_3 where the Taylor expansion needs 2 * phi_3, so each step is
exact only to the first lambda-derivative of D and the method is globally second order (order 2 measured; the
weight is checked directly in test_multistep_third_order_weighs_d2_by_half).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.common import train_alpha_bars

from .analytic import RK4_STEP, AnalyticNetwork, Mixture, final_level, gaussian, uniform_log_snr_betas

GAUSSIAN = gaussian((0.3, -0.2), 0.5)
MIXTURE = Mixture((0.3, 0.7), ((-1.0, 0.5), (0.8, -0.3)), (0.3, 0.5))
PROBLEMS = {"gaussian": GAUSSIAN, "mixture": MIXTURE}

TRAILING_STEPS = (10, 20, 25, 40, 50, 100, 125, 200, 250)  # divide T = 1000
SINGLESTEP_STEPS = (12, 24, 30, 48, 60, 96, 120, 192, 240)  # divide T - 1 = 960 and are multiples of 2 and 3
ASYMPTOTIC = 40  # the slope is fitted over N >= this
ORDER_TOLERANCE = 0.25
ZERO_LEVEL = 1e-8  # a final_level below this is sigma 0 (module docstring)

TRAILING = {"timestep_spacing": "trailing"}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
SINGLESTEP = {"num_train_timesteps": 961, **SIGMA_MIN}

# case -> (sampler, config, step counts, theoretical order)
CASES = {
    "ddim": ("ddim", {**TRAILING, "set_alpha_to_one": False, "clip_sample": False}, TRAILING_STEPS, 1),
    "euler": ("euler", {**TRAILING, **SIGMA_MIN}, TRAILING_STEPS, 1),
    "euler-karras": ("euler", {"use_karras_sigmas": True, **SIGMA_MIN}, TRAILING_STEPS, 1),
    "heun": ("heun", TRAILING, TRAILING_STEPS, 2),
    "heun-karras": ("heun", {"use_karras_sigmas": True}, TRAILING_STEPS, 2),
    "dpm_solver": ("dpm_solver", TRAILING, TRAILING_STEPS, 2),
    "dpm_solver-order3": ("dpm_solver", {**TRAILING, "solver_order": 3}, TRAILING_STEPS, 2),  # see docstring
    "dpmpp_2m": ("dpmpp_2m", {**TRAILING, **SIGMA_MIN}, TRAILING_STEPS, 2),
    "dpmpp_3m": ("dpmpp_3m", {**TRAILING, **SIGMA_MIN}, TRAILING_STEPS, 2),  # see docstring
    "unipc": ("unipc", {**TRAILING, **SIGMA_MIN}, TRAILING_STEPS, 3),  # UniP-2 + UniC: order 3
    "unipc-order1": ("unipc", {**TRAILING, **SIGMA_MIN, "solver_order": 1}, TRAILING_STEPS, 2),
    "unipc-zero": ("unipc", TRAILING, TRAILING_STEPS, 3),  # final_sigmas_type="zero": the default
    "unipc-bh1-zero": ("unipc", {**TRAILING, "solver_type": "bh1"}, TRAILING_STEPS, 3),
    "unipc-eps-zero": ("unipc", {**TRAILING, "predict_x0": False}, TRAILING_STEPS, 3),
    "dpm_solver_singlestep": ("dpm_solver_singlestep", SINGLESTEP, SINGLESTEP_STEPS, 2),
    "dpm_solver_singlestep-order3": (
        "dpm_solver_singlestep", {**SINGLESTEP, "solver_order": 3}, SINGLESTEP_STEPS, 3,
    ),
    "dpmpp_2s": ("dpmpp_2s", SINGLESTEP, SINGLESTEP_STEPS, 2),
    "dpmpp_3s": ("dpmpp_3s", SINGLESTEP, SINGLESTEP_STEPS, 3),
}


@cache
def betas(num_train_timesteps: int) -> tuple[float, ...]:
    return tuple(uniform_log_snr_betas(num_train_timesteps))


def config_of(case: str) -> tuple[str, dict, tuple[int, ...], int]:
    sampler, config, steps, order = CASES[case]
    config = {**config, "trained_betas": list(betas(config.get("num_train_timesteps", 1000)))}
    return sampler, config, steps, order


def noise() -> torch.Tensor:
    return torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@cache
def _flows(problem: str, x_key: bytes, sigma_from: float, levels: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    x = torch.frombuffer(bytearray(x_key), dtype=torch.float64).reshape(-1, 2)
    return tuple(PROBLEMS[problem].flows(x, sigma_from, list(levels)))


def exact_outputs(problem: str, plans: list, x: torch.Tensor) -> list[torch.Tensor]:
    """The exact output of each plan from unit noise x: the ODE solution at the plan's final level, or the exact
    final jump D(x_exact(sigma_last), sigma_last) for plans that end at sigma = 0; in the space plans return."""
    data = PROBLEMS[problem]
    first = plans[0].stages[0]
    start = (first.timestep, first.alpha, first.sigma, plans[0].init_scale)
    assert all((p.stages[0].timestep, p.stages[0].alpha, p.stages[0].sigma, p.init_scale) == start for p in plans)
    x_ve, sigma_from = plans[0].init_scale * x / first.alpha, first.sigma / first.alpha
    finals = [final_level(p) for p in plans]
    finals = [0.0 if f < ZERO_LEVEL else f for f in finals]
    levels = tuple(f if f > 0 else p.stages[-1].sigma / p.stages[-1].alpha for f, p in zip(finals, plans, strict=True))
    solved = _flows(problem, x_ve.numpy().tobytes(), sigma_from, levels)
    outputs = []
    for plan, final, level, x_level in zip(plans, finals, levels, solved, strict=True):
        if final == 0.0:
            outputs.append(plan.output_scale * data.denoise(x_level, torch.tensor(level, dtype=torch.float64)))
        else:
            outputs.append(plan.output_scale / math.sqrt(1.0 + final**2) * x_level)
    return outputs


def errors(case: str, problem: str) -> tuple[np.ndarray, np.ndarray]:
    sampler, config, steps, _ = config_of(case)
    resolved = blitzdiff.resolve(sampler, config)
    network = AnalyticNetwork(PROBLEMS[problem], train_alpha_bars(resolved))
    x = noise()
    plans = [build_plan(resolved, n) for n in steps]
    refs = exact_outputs(problem, plans, x)
    errs = []
    for n, ref in zip(steps, refs, strict=True):
        out = blitzdiff.sample(network, x, steps=n, sampler=sampler, scheduler_config=config)
        errs.append((out - ref).abs().max().item())
    return np.array(steps, dtype=np.float64), np.array(errs)


def measured_order(steps: np.ndarray, errs: np.ndarray) -> float:
    tail = steps >= ASYMPTOTIC
    return -np.polyfit(np.log(steps[tail]), np.log(errs[tail]), 1)[0]


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("case", list(CASES))
def test_convergence_order(case, problem):
    sampler, config, steps, order = config_of(case)
    resolved = blitzdiff.resolve(sampler, config)
    alpha_bar_0 = train_alpha_bars(resolved)[0]
    lands_on_zero = sampler == "heun" or resolved.fields.get("final_sigmas_type") == "zero"
    target = 0.0 if lands_on_zero else math.sqrt((1 - alpha_bar_0) / alpha_bar_0)  # sigma_min
    for n in (1, steps[0], steps[-1]):  # the plans land where the docstring says
        assert final_level(build_plan(resolved, n)) == pytest.approx(target, rel=1e-6, abs=ZERO_LEVEL)
    steps, errs = errors(case, problem)
    assert np.all(np.diff(errs) < 0), f"{case}: error does not decrease with N: {errs}"
    assert errs[-1] > 1e-11, f"{case}: error {errs[-1]} at the float64 floor, the slope would be noise"
    p = measured_order(steps, errs)
    assert abs(p - order) < ORDER_TOLERANCE, f"{case} on {problem}: order {p:.2f}, theory {order}; errors {errs}"


def test_dpmpp_2m_fixed_step_accuracy():
    """The default sampler with diffusers' default config (linear betas, final jump to sigma = 0) at 20 steps: its
    error against the exact jump from the exact ODE state is below 0.03 (data std 0.5, start at sigma 157; 0.017
    measured) and an order of magnitude below DDIM's at the same N (0.21)."""
    x = noise()
    out_errors = {}
    for sampler in ("dpmpp_2m", "ddim"):
        config = {"clip_sample": False} if sampler == "ddim" else {}
        resolved = blitzdiff.resolve(sampler, config)
        plan = build_plan(resolved, 20)
        assert final_level(plan) == 0.0
        (ref,) = exact_outputs("gaussian", [plan], x)
        out = blitzdiff.sample(AnalyticNetwork(GAUSSIAN, train_alpha_bars(resolved)), x, steps=20, sampler=sampler,
                               scheduler_config=config)
        out_errors[sampler] = (out - ref).abs().max().item()
    assert out_errors["dpmpp_2m"] < 0.03, out_errors
    assert out_errors["dpmpp_2m"] < out_errors["ddim"] / 10, out_errors


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "heun", "dpm_solver", "unipc"])
def test_prediction_types_agree(sampler):
    """The exact network in epsilon, v and x0 form is the same denoiser, so the outputs agree, up to the level
    mismatch of diffusers' float32 sigma tables (mirrored by the plans; the network reads float64 levels), which
    the parameterizations amplify differently (x0 = (x - sigma * eps) / alpha at sigma_ve = 80)."""
    config = {"trained_betas": list(betas(1000)), "timestep_spacing": "trailing"}
    alpha_bars = train_alpha_bars(blitzdiff.resolve(sampler, config))
    x = noise()
    outs = [
        blitzdiff.sample(AnalyticNetwork(MIXTURE, alpha_bars, kind), x, steps=10, sampler=sampler,
                         scheduler_config={**config, "prediction_type": kind})
        for kind in ("epsilon", "v_prediction", "sample")
    ]
    for out in outs[1:]:
        assert (out - outs[0]).abs().max().item() < 1e-6


def test_multistep_third_order_weighs_d2_by_half():
    """dpmpp_3m's step from lambda_k to lambda_k+1 is exact for D(lambda) = lambda - lambda_k, but for
    D = (lambda - lambda_k)^2 it gives half of the exact alpha_k+1 * (h^2 - 2h + 2 - 2e^-h) (the data-prediction
    exponential integrator, Lu et al. 2022b eq. 8): the mirrored diffusers D2 weight, which makes the method
    globally second order (module docstring)."""
    _, config, _, _ = config_of("dpmpp_3m")
    plan = build_plan(blitzdiff.resolve("dpmpp_3m", config), 250)
    lam = [math.log(s.alpha / s.sigma) for s in plan.stages]
    for k in (10, 125, 240):
        h = lam[k + 1] - lam[k]
        alpha_next = plan.stages[k + 1].alpha
        exact = alpha_next * (h * h - 2 * h - 2 * math.expm1(-h))
        weights = plan.stages[k].update.denoised
        assert len(weights) == 3
        ours = sum(w * (lam[k - j] - lam[k]) ** 2 for j, w in enumerate(weights))
        linear = sum(w * (lam[k - j] - lam[k]) for j, w in enumerate(weights))
        assert linear == pytest.approx(alpha_next * (h + math.expm1(-h)), rel=1e-6)  # exact to D'
        assert ours / exact == pytest.approx(0.5, abs=0.03)


def test_reference_integrator():
    """RK4 at RK4_STEP against the Gaussian's closed form, and against itself at half the step on the mixture: its
    error (< 1e-9) is four orders of magnitude below the smallest solver error measured above (7e-6)."""
    x = noise()[:4] * 80.0
    closed = GAUSSIAN.flow(x, 80.0, 0.005)
    steps = math.ceil(math.log(80.0 / 0.005) / RK4_STEP)
    assert (GAUSSIAN.rk4(x, 80.0, 0.005, steps) - closed).abs().max().item() < 1e-9
    fine = MIXTURE.rk4(x, 80.0, 0.005, 2 * steps)
    assert (MIXTURE.flow(x, 80.0, 0.005) - fine).abs().max().item() < 1e-9


def test_mixture_denoiser_is_tweedie():
    """E[x0 | x] = x + sigma^2 grad log p_sigma(x) (Tweedie / Karras et al. 2022 eq. 3) with the mixture density
    convolved with N(0, sigma^2 I) written independently of Mixture.denoise."""
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    for sigma in (0.01, 0.3, 2.0, 50.0):
        xg = x.clone().requires_grad_(True)
        log_p = torch.logsumexp(torch.stack([
            math.log(w) - ((xg - torch.tensor(mu, dtype=torch.float64)) ** 2).sum(1) / (2 * (s * s + sigma**2))
            - math.log(s * s + sigma**2)  # 2-D normalization: -C/2 * log(variance), C = 2
            for w, mu, s in zip(MIXTURE.weights, MIXTURE.means, MIXTURE.stds, strict=True)
        ]), dim=0)
        (grad,) = torch.autograd.grad(log_p.sum(), xg)
        tweedie = x + sigma**2 * grad
        assert torch.allclose(MIXTURE.denoise(x, torch.tensor(sigma, dtype=torch.float64)), tweedie, atol=1e-12)


def test_network_reads_the_noise_level():
    """Integer timesteps index alphas_cumprod; float timesteps invert schedules.sigma_to_t (float32 t: 1e-5)."""
    from blitzdiff.engine.schedules import sigma_to_t

    alpha_bars = train_alpha_bars(blitzdiff.resolve("euler"))
    network = AnalyticNetwork(GAUSSIAN, alpha_bars)
    t = torch.tensor([0, 1, 500, 999])
    for by_int, by_float in zip(network.levels(t), network.levels(t.float()), strict=True):
        assert torch.allclose(by_int, by_float, rtol=1e-12)
    train_sigmas = np.sqrt((1 - alpha_bars) / alpha_bars)
    sigma = np.exp(np.linspace(np.log(train_sigmas[0]), np.log(train_sigmas[-1]), 37))
    t = torch.from_numpy(sigma_to_t(sigma, np.log(train_sigmas))).float()
    alpha, sig = network.levels(t)
    np.testing.assert_allclose((sig / alpha).numpy(), sigma, rtol=1e-5)
