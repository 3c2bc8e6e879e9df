"""Multistep DPM-Solver (Lu et al. 2022a, "DPM-Solver", noise prediction) and DPM-Solver++ (Lu et al. 2022b,
"DPM-Solver++", data prediction; Algorithm 2 is DPM-Solver++(2M)), ODE and SDE variants (the latter as Lu added
them to diffusers, PR #3344), as a plan with diffusers' DPMSolverMultistepScheduler conventions.

Step i goes from the VE noise level sigma_i to sigma_{i+1} (VP alpha, sigma; lambda = log(alpha / sigma),
h = lambda_{i+1} - lambda_i) by an exponential-integrator update linear in the state x_i and the newest model outputs
m_0 = m(x_i), m_1, m_2:
    x_{i+1} = a * x_i + c0 * m_0 + c1 * D1 (+ c2 * D2) (+ noise * z),
D1, D2 the divided differences of the outputs in lambda. The outputs are data predictions for dpmsolver++ /
sde-dpmsolver++ (the denoised history D itself) and noise predictions eps_j = (x_j - alpha_j D_j) / sigma_j for
dpmsolver / sde-dpmsolver (with thresholding, diffusers also converts the thresholded x0 back to eps this way).

eps_{i-1}, eps_{i-2} are read from the points the loop keeps next to the denoised history (Combination.points),
so every variant keeps solver_order estimates. diffusers has no third-order sde-dpmsolver update (it fails with
UnboundLocalError); such a step is refused. sde-dpmsolver++ at third order deliberately differs from diffusers: it has
k-diffusion's sign on the 0.5 in the D2 weight, not diffusers' (see _step).
"""

from __future__ import annotations

import math

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import vp_from_ve
from .common import at_state, dpm_schedule, linear, noise_estimate


def _lambda(sigma_ve: float) -> float:
    """lambda = log(alpha / sigma) = -log(sigma_ve), the half log-SNR; +inf at the clean endpoint sigma_ve = 0."""
    return math.inf if sigma_ve == 0.0 else -math.log(sigma_ve)


def _order(config: SchedulerConfig, i: int, n: int) -> int:
    """diffusers' order at step i of n: warm-up from first order (only i outputs exist yet), first order at the end
    for euler_at_final, a zero final sigma, or lower_order_final below 15 steps (second order one step earlier)."""
    final = i == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                            or config.final_sigmas_type == "zero")
    second_final = i == n - 2 and config.lower_order_final and n < 15
    return min(config.solver_order, i + 1, 1 if final else 2 if second_final else 3)


def _step(
    config: SchedulerConfig, order: int, sigmas: list[float], sigma_next: float
) -> tuple[float, tuple[float, ...], float]:
    """The update of one step: (a, weights of m_0 .. m_{order-1}, noise weight).

    sigmas: the VE noise levels of the outputs' evaluations, newest first; sigma_next: the target's.
    """
    sde = config.algorithm_type.startswith("sde-")
    (alpha_s, sigma_s), (alpha_t, sigma_t) = vp_from_ve(sigmas[0]), vp_from_ve(sigma_next)
    lambdas = [_lambda(s) for s in sigmas]
    h = _lambda(sigma_next) - lambdas[0]
    if config.algorithm_type.endswith("++"):
        # data prediction (Lu et al. 2022b, eq. 9 and sec. 5): the SDE's integrator has the ODE's weights in 2h
        hh = 2.0 * h if sde else h
        phi_1 = -math.expm1(-hh)  # 1 - exp(-hh)
        a = sigma_t / sigma_s * (math.exp(-h) if sde else 1.0)
        c0 = alpha_t * phi_1
        if order > 1 and h != 0.0:
            c1 = alpha_t * (1.0 - phi_1 / hh)
            # D2 weight of DPM-Solver++(3M) (Lu et al. 2022b's code, multistep_dpm_solver_third_order_update;
            # k-diffusion's sample_dpmpp_3m_sde: x += phi_2 * d1 - phi_3 * d2, phi_2 = 1 - phi_1 / hh,
            # phi_3 = phi_2 / hh - 0.5, hh = h_eta = 2h for the SDE): alpha_t * -phi_3 = alpha_t * (0.5 - (hh -
            # phi_1) / hh^2) = alpha_t * (hh / 6 + O(hh^2)), the ODE's weight with h -> hh as for c0 and c1.
            # (Integrating the quadratic interpolant m_0 + D1 s + D2 s^2, s = (lambda - lambda_i) / h, against the
            # kernel exactly gives twice this, alpha_t * (1 - 2 / hh + 2 phi_1 / hh^2); Lu's half weight, which
            # every 3M shares, diffusers' ODE branch included, leaves the update second order, test_convergence.)
            # Deliberate divergence from diffusers: its sde-dpmsolver++ branch has -0.5 for +0.5, a D2 weight of
            # alpha_t * (-1 + O(h)); with it the update is first order and amplifies D2 until the sample blows up
            # at a few hundred steps (norm 1e32 at 999). We use k-diffusion's sign for both variants.
            c2 = alpha_t * (0.5 - (hh - phi_1) / hh**2)
        noise = sigma_t * math.sqrt(-math.expm1(-2.0 * h)) if sde else 0.0
    else:
        # noise prediction (Lu et al. 2022a, eq. 3.7-3.8; the SDE doubles the output weights, Lu et al. 2022b sec. 5)
        k = 2.0 if sde else 1.0
        phi_1 = math.expm1(h)  # exp(h) - 1
        a = alpha_t / alpha_s
        c0 = -k * sigma_t * phi_1
        if order > 1 and h != 0.0:
            c1 = -k * sigma_t * (phi_1 / h - 1.0)
            c2 = -sigma_t * ((phi_1 - h) / h**2 - 0.5)  # dpmsolver only: sde-dpmsolver has no third order
        noise = sigma_t * math.sqrt(math.expm1(2.0 * h)) if sde else 0.0
    if order == 1:
        return a, (c0,), noise
    assert sigma_next > 0.0, "diffusers steps to sigma = 0 only at first order"
    if h == 0.0:  # a zero-length midpoint step: D1 = (m_0 - m_1) / inf weighs c0 / 2 = 0, the identity
        return a, (0.0, 0.0), noise
    r0 = (lambdas[0] - lambdas[1]) / h
    if order == 2:  # D1 = (m_0 - m_1) / r0; midpoint weighs it by c0 / 2 (DPM-Solver-2M), heun by c1
        c1 = 0.5 * c0 if config.solver_type == "midpoint" else c1
        return a, (c0 + c1 / r0, -c1 / r0), noise
    # third order: D1_0 = (m_0 - m_1) / r0, D1_1 = (m_1 - m_2) / r1, D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1),
    # D2 = (D1_0 - D1_1) / (r0 + r1); u, v are the weights of D1_0 and D1_1
    r1 = (lambdas[1] - lambdas[2]) / h
    u = c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)
    v = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)
    return a, (c0 + u / r0, -u / r0 + v / r1, -v / r1), noise


def dpm_multistep(config: SchedulerConfig, steps: int) -> Plan:
    """DPM-Solver / DPM-Solver++ multistep (orders 1-3, midpoint / heun, ODE or SDE) as a plan."""
    algorithm = config.algorithm_type
    noise_prediction = algorithm in ("dpmsolver", "sde-dpmsolver")
    timesteps, sigmas = dpm_schedule(
        config, steps, round_karras_timesteps=config.beta_schedule != "squaredcos_cap_v2"
    )
    sigmas = [float(s) for s in sigmas]
    n = len(timesteps)
    stages = []
    for i, t in enumerate(timesteps):
        order = _order(config, i, n)
        if order == 3 and algorithm == "sde-dpmsolver":
            raise ValueError(f"DPMSolverMultistepScheduler: algorithm_type='sde-dpmsolver' has no third-order update "
                             f"in diffusers (it fails with UnboundLocalError), and solver_order=3 takes one at step "
                             f"{i} of {steps}; use solver_order <= 2 (or lower_order_final with at most 4 steps)")
        # zero-length steps (a repeated noise level: linspace / leading spacing near num_train_timesteps steps,
        # trailing spacing's final timestep -1) in this step's window, oldest first; the divided differences divide
        # by their length, so diffusers returns NaN except for a current zero-length midpoint step (the identity)
        zero_length = [sigmas[k] == sigmas[k + 1] for k in range(i - order + 1, i + 1)]
        if order > 1 and (any(zero_length[:-1]) or zero_length[-1] and (order == 3 or config.solver_type == "heun")):
            raise ValueError(f"DPMSolverMultistepScheduler: steps={steps} repeat a noise level at timestep "
                             f"{timesteps[i]}, a zero-length step that diffusers' order-{order} update divides by "
                             "(it returns NaN); use fewer steps or solver_order=1")
        a, weights, noise = _step(config, order, [sigmas[i - j] for j in range(order)], sigmas[i + 1])
        update = Combination(x=a, denoised=weights, noise=noise)
        if noise_prediction:  # eps_{i-j} from the point and estimate of step i - j; the newest point is x_i itself
            eps = [noise_estimate(j, *vp_from_ve(sigmas[i - j])) for j in range(order)]
            update = at_state(linear((1.0, Combination(x=a, noise=noise)), *zip(weights, eps, strict=True)))
        alpha, sigma = vp_from_ve(sigmas[i])
        stages.append(Stage(float(t), alpha, sigma, update=update))
    return Plan(tuple(stages))
