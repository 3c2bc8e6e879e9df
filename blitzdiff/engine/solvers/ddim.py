"""DDIM (Song et al. 2021, eq. 12) and DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) as plans, with diffusers'
DDIMScheduler / DDPMScheduler timestep conventions."""

from __future__ import annotations

import math

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import vp_from_alpha_bar
from .common import spaced_timesteps, train_alpha_bars


def _post_processed(config: SchedulerConfig) -> bool:
    return bool(config.fields.get("thresholding") or config.fields.get("clip_sample"))


def ddim(config: SchedulerConfig, steps: int, eta: float = 0.0) -> Plan:
    """x_prev = a_prev * x0 + sqrt(1 - a_prev^2 - std^2) * eps + std * z, std = eta * sqrt(var(t -> t_prev)).

    As in diffusers, t_prev = t - num_train_timesteps // steps whatever the spacing, and eps is the network's own
    (unclipped) noise estimate even when x0 is clipped or thresholded.
    """
    alpha_bars = train_alpha_bars(config)
    final_alpha_bar = 1.0 if config.set_alpha_to_one else alpha_bars[0]
    stride = config.num_train_timesteps // steps
    stages = []
    for t in spaced_timesteps(config, steps):
        ab, ab_prev = alpha_bars[t], (alpha_bars[t - stride] if t - stride >= 0 else final_alpha_bar)
        alpha, sigma = vp_from_alpha_bar(ab)
        alpha_prev = math.sqrt(ab_prev)
        variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        std = eta * math.sqrt(variance)
        if std**2 > 1 - ab_prev:  # the noise would take more than the whole variance of x_prev (eta <= 1 never does)
            raise ValueError(f"eta={eta:g} is too large for DDIM at timestep {t} of this {steps}-step schedule: "
                             f"there it may be at most {math.sqrt((1 - ab_prev) / variance):.4g} (eta <= 1 always "
                             "works)")
        direction = math.sqrt(1 - ab_prev - std**2) / sigma  # coefficient of eps = (x - alpha * D_raw) / sigma
        if _post_processed(config):
            update = Combination(x=direction, denoised=(alpha_prev,), raw=-direction * alpha, noise=std)
        else:
            update = Combination(x=direction, denoised=(alpha_prev - direction * alpha,), noise=std)
        stages.append(Stage(float(t), alpha, sigma, update=update))
    return Plan(tuple(stages))


def ddpm(config: SchedulerConfig, steps: int) -> Plan:
    """Ancestral step from the posterior q(x_prev | x_t, x0): mean = c0 * x0 + ct * x_t, plus sqrt(var) * z
    (no noise at t = 0). variance_type fixed_small: beta~_t (posterior variance); fixed_large: beta_t."""
    alpha_bars = train_alpha_bars(config)
    timesteps = spaced_timesteps(config, steps)
    stages = []
    for i, t in enumerate(timesteps):
        ab = alpha_bars[t]
        ab_prev = alpha_bars[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        alpha_t, beta_t = ab / ab_prev, 1 - ab / ab_prev  # the effective one-step alpha / beta for this stride
        c0 = math.sqrt(ab_prev) * beta_t / (1 - ab)
        ct = math.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab)
        posterior = max((1 - ab_prev) / (1 - ab) * beta_t, 1e-20)
        variance = beta_t if config.variance_type == "fixed_large" else posterior
        std = math.sqrt(variance) if t > 0 else 0.0
        alpha, sigma = vp_from_alpha_bar(ab)
        stages.append(Stage(float(t), alpha, sigma, update=Combination(x=ct, denoised=(c0,), noise=std)))
    return Plan(tuple(stages))
