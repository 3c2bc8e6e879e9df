"""Singlestep DPM-Solver (Lu et al. 2022, "DPM-Solver", Algorithms 1-2) and DPM-Solver++ 2S / 3S (Lu et al. 2022,
"DPM-Solver++", Algorithm 1), as a plan with diffusers' DPMSolverSinglestepScheduler conventions.

diffusers treats every entry of its timestep list as one network evaluation and groups them into singlesteps by its
order list, e.g. [1, 2, 3, 1, 2, 3, ...]: a singlestep of order k starts from the sample x_s at its first entry and
takes k evaluations, the j-th at the intermediate point that the order-j update from x_s reaches (the scheduler's
`self.sample` holds x_s). In the plan each evaluation is a Stage; inside a singlestep the state stays at x_s
(update None) and `point` is the intermediate sample; the last stage of the singlestep replaces the state.
sde-dpmsolver++ draws noise at every diffusers step: inside a singlestep it lands in the next stage's point (the
loop's point stream of that stage), at its end in the update, since the state must keep x_s noise-free until then.

All updates are linear in x_s and the group's model outputs m_0, m_1, ..., so each one is computed here as a
coefficient vector over the basis [x_s, D_0, D_1, D_2] (the group's denoised estimates, oldest first).
"""

from __future__ import annotations

import math

import numpy as np

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import vp_from_ve
from .common import dpm_schedule

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")


def order_list(config: SchedulerConfig, steps: int) -> list[int]:
    """diffusers' get_order_list with the lower_order_final that its set_timesteps forces: on when steps is not a
    multiple of solver_order or the final sigma is zero (whose last update must be first order)."""
    order = config.solver_order
    lower_order_final = config.lower_order_final or steps % order != 0 or config.final_sigmas_type == "zero"
    if order == 1:
        orders = [1] * steps
    elif not lower_order_final:
        orders = [*range(1, order + 1)] * (steps // order)
    elif order == 2:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    elif steps % 3 == 0:
        orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
    else:
        orders = [1, 2, 3] * (steps // 3) + [1, 2][: steps % 3]
    if config.final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


def _lambda(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), the half log-SNR; +inf at sigma = 0 (the clean endpoint)."""
    return math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)


def _update(algorithm: str, solver_type: str, sample: np.ndarray, outputs: list[np.ndarray], sigmas: list[float]):
    """diffusers' dpm_solver_first_order_update / singlestep_dpm_solver_{second,third}_order_update on vectors.

    sample: the singlestep's starting sample x_s; outputs: the model outputs m (data or noise predictions) at the
    group's evaluations so far, oldest first; sigmas: their VE noise levels, then the target's. Returns the new
    sample as a vector and its noise weight (sde-dpmsolver++ only). Every order has the form
        x_t = a * x_s + b * D0 + c1 * D1 + c2 * D2 (+ noise * z),  h = lambda_t - lambda_s,
    D0 the output at x_s and D1, D2 divided differences of the outputs in lambda: DPM-Solver (Lu et al. 2022a,
    noise prediction) eq. 3.7 and Algorithms 1-2, DPM-Solver++ (Lu et al. 2022b, data prediction) Algorithm 1 (2S);
    the "heun" weights and the SDE variant exactly as diffusers writes them. expm1 stands for diffusers' exp - 1.
    """
    order = len(outputs)
    (alpha_s, sigma_s), (alpha_t, sigma_t) = vp_from_ve(sigmas[0]), vp_from_ve(sigmas[-1])
    lambda_s, lambda_t = _lambda(alpha_s, sigma_s), _lambda(alpha_t, sigma_t)
    h = lambda_t - lambda_s
    noise = 0.0
    if algorithm == "dpmsolver++":
        a, b = sigma_t / sigma_s, -alpha_t * math.expm1(-h)
    elif algorithm == "dpmsolver":
        a, b = alpha_t / alpha_s, -sigma_t * math.expm1(h)
    else:  # sde-dpmsolver++
        a, b = sigma_t / sigma_s * math.exp(-h), -alpha_t * math.expm1(-2.0 * h)
        noise = sigma_t * math.sqrt(-math.expm1(-2.0 * h))
    if order == 1:
        return a * sample + b * outputs[0], noise
    assert sigma_t > 0.0, "diffusers takes only first-order steps to sigma = 0"
    # c1, c2: the weights of the first and second divided differences (the phi_2 / phi_3 terms)
    if algorithm == "dpmsolver++":
        c1 = alpha_t * (math.expm1(-h) / h + 1.0)
        c2 = -alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5)
    elif algorithm == "dpmsolver":
        c1 = -sigma_t * (math.expm1(h) / h - 1.0)
        c2 = -sigma_t * ((math.expm1(h) - h) / h**2 - 0.5)
    else:
        c1 = alpha_t * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0)
        c2 = alpha_t * ((-math.expm1(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    lambdas = [_lambda(*vp_from_ve(s)) for s in sigmas[:-1]]
    if order == 2:
        m1, m0 = outputs  # m1 at the start of the step, m0 at its intermediate point
        r0 = (lambdas[1] - lambdas[0]) / h
        d1 = (m0 - m1) / r0
        return a * sample + b * m1 + (0.5 * b if solver_type == "midpoint" else c1) * d1, noise
    m2, m1, m0 = outputs
    r0, r1 = (lambdas[2] - lambdas[0]) / h, (lambdas[1] - lambdas[0]) / h
    d1_0, d1_1 = (m1 - m2) / r1, (m0 - m2) / r0
    if solver_type == "midpoint":
        return a * sample + b * m2 + c1 * d1_1, noise
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return a * sample + b * m2 + c1 * d1 + c2 * d2, noise


def _combination(vector: np.ndarray, newest: int, noise: float = 0.0) -> Combination:
    """A vector over [x_s, D_0, D_1, D_2] as a Combination whose newest history entry is D_newest."""
    return Combination(x=float(vector[0]), denoised=tuple(float(c) for c in vector[newest + 1 : 0 : -1]),
                       noise=noise)


def dpm_singlestep(config: SchedulerConfig, steps: int) -> Plan:
    """DPM-Solver / DPM-Solver++ singlestep (orders 1-3, midpoint / heun, optional SDE noise) as a plan."""
    algorithm, solver_type = config.algorithm_type, config.solver_type
    if algorithm not in ALGORITHMS:
        raise ValueError(f"DPMSolverSinglestepScheduler: algorithm_type={algorithm!r} is not supported; allowed: "
                         f"{', '.join(map(repr, ALGORITHMS))}")
    if algorithm == "dpmsolver" and config.thresholding:
        # diffusers' convert_model_output indexes alpha_t with an unset timestep here and fails
        raise ValueError("DPMSolverSinglestepScheduler: thresholding=True is not supported with "
                         "algorithm_type='dpmsolver'; use algorithm_type='dpmsolver++' or 'sde-dpmsolver++'")
    timesteps, sigmas = dpm_schedule(config, steps)  # singlestep: linspace spacing, Karras timesteps rounded
    orders = order_list(config, steps)
    basis = np.eye(4)  # x_s, D_0, D_1, D_2
    stages = []
    for i, order in enumerate(orders):
        start = i - order + 1  # where this singlestep began (diffusers' self.sample)
        assert orders[start : i + 1] == list(range(1, order + 1))
        if len(set(sigmas[start : i + 1])) < order:
            # diffusers divides by the zero step h_0 = lambda_s0 - lambda_s1 and returns NaN
            raise ValueError(f"DPMSolverSinglestepScheduler: {steps} steps repeat the noise level "
                             f"{sigmas[i]:.6g} inside one order-{order} singlestep; use fewer steps")
        alpha, sigma = vp_from_ve(sigmas[i])
        if order == 1:  # a singlestep starts here: the state is diffusers' self.sample, the basis' x_s
            reached, reached_noise, outputs = basis[0], 0.0, []
        point = None if order == 1 else _combination(reached, order - 2, reached_noise)
        if algorithm == "dpmsolver":  # a noise prediction: eps = (x - alpha * D) / sigma at the evaluation point
            outputs.append((reached - alpha * basis[order]) / sigma)
        else:
            outputs.append(basis[order])
        sample, noise = _update(algorithm, solver_type, basis[0], outputs, [*sigmas[start : i + 1], sigmas[i + 1]])
        last = i + 1 == len(orders) or orders[i + 1] == 1
        update = _combination(sample, order - 1, noise) if last else None
        reached, reached_noise = sample, noise  # the sample diffusers' step returns, next evaluation's point
        stages.append(Stage(float(timesteps[i]), alpha, sigma, point=point, update=update))
    return Plan(tuple(stages))
