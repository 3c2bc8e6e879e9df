"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models")
as a plan, with diffusers' UniPCMultistepScheduler conventions.

diffusers' step k: evaluate the network at the predicted sample x_k; correct x_k with UniC (from the previous
corrected sample and the model outputs up to the new one); predict x_{k+1} from the corrected sample with UniP.
In the plan the state is the corrected sample, stage k's point is the predictor result and its update the
corrector; the last stage's update also applies the final predictor (that is the sample diffusers returns).

Both updates are linear in the state and the model outputs m_j: x0 estimates D_j when predict_x0, else noise
estimates eps_j = (x_j - alpha_j D_j) / sigma_j at the evaluation points x_j, which the loop keeps next to the
denoised history (Combination.points). Either way a plan keeps solver_order + 1 estimates (the corrector's window).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import exponential_sigmas, karras_sigmas, sigma_to_t, vp_from_ve
from .common import denoised_estimate, linear, noise_estimate, train_ve_sigmas


def unipc_schedule(config: SchedulerConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler.set_timesteps: (timesteps [steps] as the network receives them, VE sigmas
    [steps + 1] with the final one appended), sigmas rounded to float32 as diffusers stores them.

    The timesteps come from steps + 1 spaced points minus the last (linspace, leading) or the trailing spacing;
    Karras / exponential sigmas replace them by each sigma's fractional training timestep (interpolated in
    log(sigma)), rounded for Karras and truncated toward zero for exponential (diffusers' int64 cast).
    """
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = n // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:  # trailing
        timesteps = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
    train_sigmas = train_ve_sigmas(config)  # float32 [T]
    if config.use_karras_sigmas or config.use_exponential_sigmas:
        sigma_min = config.sigma_min if config.sigma_min is not None else float(train_sigmas[0])
        sigma_max = config.sigma_max if config.sigma_max is not None else float(train_sigmas[-1])
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(sigma_min, sigma_max, steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).round()
        else:
            sigmas = exponential_sigmas(sigma_min, sigma_max, steps)
            timesteps = np.trunc(sigma_to_t(sigmas, np.log(train_sigmas)))
        sigma_last = sigmas[-1]
    else:
        sigmas = np.interp(timesteps, np.arange(n), train_sigmas)
        sigma_last = train_sigmas[0]
    sigma_last = sigma_last if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32).astype(np.float64)
    return timesteps.astype(np.float64), sigmas


def _check(config: SchedulerConfig, steps: int) -> None:
    """Refuse the configurations without a finite update (diffusers returns NaN / inf there too) and the fields
    diffusers ignores."""
    disabled = config.disable_corrector
    if not isinstance(disabled, Sequence) or not all(isinstance(i, int) for i in disabled):
        raise ValueError(f"UniPCMultistepScheduler: disable_corrector must be a list of step indices (ints), got "
                         f"{disabled!r}")
    if config.final_sigmas_type == "zero" and not config.lower_order_final and config.solver_order > 1 and steps > 1:
        # into sigma 0 (h = inf) an order >= 2 UniP extrapolates the model outputs to lambda = inf: r_k -> 0, so its
        # terms B(h) rho_k (m_k - m_s0) / r_k grow like h or faster; only an order-1 last step has a finite limit
        raise ValueError("UniPCMultistepScheduler: lower_order_final=False with final_sigmas_type='zero' has no "
                         "finite last step (a multistep update into sigma 0 extrapolates to lambda = inf; diffusers "
                         "divides by zero there); use lower_order_final=True or final_sigmas_type='sigma_min'")
    if config.thresholding and not config.predict_x0:
        raise ValueError("UniPCMultistepScheduler: thresholding acts only on x0 estimates (predict_x0=True); "
                         "diffusers ignores it with predict_x0=False. Set thresholding=False or predict_x0=True")


def _uni_bh(
    lambdas: np.ndarray, alphas: np.ndarray, sigmas: np.ndarray, s0: int, order: int, *, corrector: bool,
    predict_x0: bool, bh1: bool,
) -> tuple[float, dict[int, float]]:
    """One UniP (or UniC when `corrector`) B(h) update from noise level s0 to s0 + 1 (Zhao et al. 2023, sec. 3;
    diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update): x_next = a * x + sum_j c_j * m_j.

    Uses m_{s0}, ..., m_{s0 - order + 1} and, for UniC, the new m_{s0 + 1}. Returns (a, {j: c_j}).

    Into sigma_t = 0 (h = inf; only the last, order-1 UniP: _check) the update is its limit, in which B(h) plays
    no part: it multiplies the empty sum of an order-1 step. diffusers evaluates that term as B(h) * 0, NaN for
    bh1 (B(h) = -inf), and sigma_t (e^h - 1) as 0 * inf, NaN for noise prediction.
    """
    t = s0 + 1
    if sigmas[t] == 0:
        assert order == 1 and not corrector
        if predict_x0:  # sigma_t / sigma_s0 -> 0, -alpha_t (e^-h - 1) -> 1: x_t = D_s0
            return 0.0, {s0: 1.0}
        # sigma_t (e^h - 1) = alpha_t sigma_s0 / alpha_s0 - sigma_t: x_t = alpha_t / alpha_s0 (x - sigma_s0 eps_s0)
        return float(alphas[t] / alphas[s0]), {s0: float(-alphas[t] * sigmas[s0] / alphas[s0])}
    h = lambdas[t] - lambdas[s0]
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
    b_h = hh if bh1 else np.expm1(hh)  # B(h): bh1 is B1(h) = h, bh2 is B2(h) = e^h - 1
    if predict_x0:  # data prediction: x_t = sigma_t / sigma_s0 x - alpha_t (e^-h - 1) m_s0 - alpha_t B(h) sum
        a, base, scale = sigmas[t] / sigmas[s0], alphas[t] * h_phi_1, alphas[t] * b_h
    else:  # noise prediction: x_t = alpha_t / alpha_s0 x - sigma_t (e^h - 1) m_s0 - sigma_t B(h) sum
        a, base, scale = alphas[t] / alphas[s0], sigmas[t] * h_phi_1, sigmas[t] * b_h
    ratios = [(lambdas[s0 - k] - lambdas[s0]) / h for k in range(1, order)]  # r_k, k = 1 .. order - 1
    if order == 1:
        rhos = [0.5] if corrector else []
    elif order == 2 and not corrector:
        rhos = [0.5]  # diffusers' simplified second-order predictor
    else:
        # the order conditions sum_k rho_k r_k^(i-1) = b_i, b_i = (i - 1)! h phi_i(h) / B(h), with r = 1 appended for
        # the new point (UniP drops its row and column), solved on the host in float64
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        powers = np.array(ratios + [1.0]) ** np.arange(order)[:, None]  # [order, order], row i: r^i
        size = order if corrector else order - 1
        rhos = list(np.linalg.solve(powers[:size, :size], np.array(b[:size])))
    # x_t = a x - base m_s0 - scale (sum_k rho_k (m_{s0-k} - m_s0) / r_k [+ rho_last (m_t - m_s0)])
    coefficients = {s0: -base}
    for k, (rho, r_k) in enumerate(zip(rhos[:order - 1], ratios, strict=True), start=1):
        coefficients[s0 - k] = -scale * rho / r_k
        coefficients[s0] += scale * rho / r_k
    if corrector:
        coefficients[t] = -scale * rhos[-1]
        coefficients[s0] += scale * rhos[-1]
    return float(a), {j: float(c) for j, c in coefficients.items()}


def _output(j: int, newest: int, alphas: np.ndarray, sigmas: np.ndarray, predict_x0: bool) -> Combination:
    """The model output m_j of evaluation j when the newest is evaluation `newest`: D_j, or eps_j."""
    if predict_x0:
        return denoised_estimate(newest - j)
    return noise_estimate(newest - j, float(alphas[j]), float(sigmas[j]))


def unipc(config: SchedulerConfig, steps: int) -> Plan:
    """UniPC-p multistep with UniC after every evaluation but the first and those listed in disable_corrector.

    Orders follow diffusers: warm-up (order k + 1 at step k), lower_order_final (order <= steps left), and the
    corrector at step k reuses the order of the predictor that produced x_k.
    """
    _check(config, steps)
    timesteps, sigmas_ve = unipc_schedule(config, steps)
    alphas, sigmas = np.array([vp_from_ve(s) for s in sigmas_ve]).T  # [steps + 1] each
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)  # half log-SNR; +inf at a final sigma of 0
    if np.any(np.diff(lambdas[:-1]) <= 0):
        raise ValueError(f"UniPCMultistepScheduler: steps={steps} with timestep_spacing="
                         f"{config.timestep_spacing!r} repeats a noise level; use fewer steps")
    variant = {"predict_x0": config.predict_x0, "bh1": config.solver_type == "bh1"}

    def bh_update(s0: int, order: int, *, corrector: bool) -> Combination:
        """_uni_bh's update as a combination; the newest evaluation is s0 + 1 for UniC, s0 for UniP."""
        a, coefficients = _uni_bh(lambdas, alphas, sigmas, s0, order, corrector=corrector, **variant)
        newest = s0 + corrector
        outputs = [(c, _output(j, newest, alphas, sigmas, config.predict_x0)) for j, c in coefficients.items()]
        return linear((a, Combination()), *outputs)

    point = None  # x_0 is the initial noise itself
    order = 0
    stages = []
    for k in range(steps):
        if k > 0 and k - 1 not in config.disable_corrector:
            corrected = bh_update(k - 1, order, corrector=True)
        else:  # no corrector: the predicted sample is kept as it is (at k = 0, the state itself)
            corrected = Combination() if k == 0 else Combination(x=0.0, points=(1.0,))
        limit = min(config.solver_order, steps - k) if config.lower_order_final else config.solver_order
        order = min(limit, k + 1)
        predicted = bh_update(k, order, corrector=False)
        update = corrected.then(predicted) if k == steps - 1 else corrected  # diffusers returns the final prediction
        if not all(np.isfinite([c.x, *c.denoised, *c.points]).all() for c in (update, point) if c is not None):
            raise ValueError(f"UniPCMultistepScheduler: step {k} of {steps} has non-finite coefficients (as in "
                             "diffusers) for this configuration")
        stages.append(Stage(float(timesteps[k]), float(alphas[k]), float(sigmas[k]), point=point,
                            update=None if update == Combination() else update))
        point = predicted
    return Plan(tuple(stages))
