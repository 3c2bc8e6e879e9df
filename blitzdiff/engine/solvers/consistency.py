"""Consistency sampling as plans: multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency
Models") with diffusers' LCMScheduler conventions, and multistep consistency sampling (Song et al. 2023, "Consistency
Models", Algorithm 1) with diffusers' CMStochasticIterativeScheduler conventions.

Both alternate "jump to x0 with the consistency function" and "re-noise to the next, lower noise level": each stage
is one evaluation whose update is f(x) scaled to the next level plus fresh noise; the final stage adds none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import vp_from_alpha_bar, vp_from_ve
from .common import custom_timesteps, train_alpha_bars


def _given(config: SchedulerConfig, steps: int, timesteps: Sequence[int]) -> np.ndarray:
    t = custom_timesteps(config, timesteps)
    if len(t) != steps:
        raise ValueError(f"steps={steps} but {len(t)} timesteps were given; give matching counts or only timesteps")
    return t


def lcm_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """LCMScheduler.set_timesteps: `steps` timesteps taken evenly by index from the distillation schedule
    k - 1, 2k - 1, ..., N - 1 (k = N // original_inference_steps), descending, int64 [steps].

    timestep_spacing and steps_offset play no part (diffusers ignores them for LCM).
    """
    n, original = config.num_train_timesteps, config.original_inference_steps
    if not (isinstance(original, int) and 1 <= original <= n):
        raise ValueError(f"LCMScheduler: original_inference_steps must be an int in 1..{n} (num_train_timesteps), "
                         f"got {original!r}")
    if steps > original:
        raise ValueError(f"LCMScheduler: steps={steps} exceeds original_inference_steps={original} (the schedule "
                         f"is a subset of the distillation schedule); allowed: 1..{original}")
    origin = (np.arange(1, original + 1) * (n // original) - 1)[::-1]  # [original], descending
    return origin[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)]


def lcm(config: SchedulerConfig, steps: int, *, timesteps: Sequence[int] | None = None) -> Plan:
    """Multistep latent consistency sampling (Luo et al. 2023) on the VP sample x.

    f(x, t) = c_skip(t) * x + c_out(t) * x0(x, t) with the boundary-condition scalings of Song et al. 2023 (appendix
    C, sigma_min -> 0) in a scaled discrete time s = timestep_scaling * t: c_skip = sd^2 / (s^2 + sd^2),
    c_out = s / sqrt(s^2 + sd^2), sd = 0.5; x0 is the clipped / thresholded estimate. Then
    x_next = sqrt(alpha_bar_next) * f + sqrt(1 - alpha_bar_next) * z, except after the final step, which returns f.
    timesteps: explicit descending training timesteps (then steps = len(timesteps)).
    """
    t_all = lcm_timesteps(config, steps) if timesteps is None else _given(config, steps, timesteps)
    alpha_bars = train_alpha_bars(config)
    sigma_data = 0.5  # fixed in diffusers' get_scalings_for_boundary_condition_discrete
    stages = []
    for i, t in enumerate(t_all):
        s = float(t) * config.timestep_scaling
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s / math.sqrt(s**2 + sigma_data**2)
        alpha, sigma = vp_from_alpha_bar(alpha_bars[t])
        if i + 1 < len(t_all):
            alpha_next, sigma_next = vp_from_alpha_bar(alpha_bars[t_all[i + 1]])
        else:
            alpha_next, sigma_next = 1.0, 0.0  # the final step returns f (set_alpha_to_one plays no part)
        update = Combination(x=alpha_next * c_skip, denoised=(alpha_next * c_out,), noise=sigma_next)
        stages.append(Stage(float(t), alpha, sigma, update=update))
    return Plan(tuple(stages))


def consistency(config: SchedulerConfig, steps: int, *, timesteps: Sequence[int] | None = None) -> Plan:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) as diffusers' CMStochasticIterativeScheduler.

    Training-grid indices t (default: 0, r, 2r, ... with r = N // steps, descending; or the given `timesteps`) are
    reversed and mapped to Karras sigmas at ramp t / (N - 1), so sigma_max comes first; sigma_min follows the last.
    In VE space: x0 = f(x_ve, sigma) (the "consistency" parameterization, clip_denoised by the loop), then
    x_ve_next = x0 + s_noise * sqrt(sigma_hat^2 - sigma_min^2) * z, sigma_hat = sigma_next clamped to
    [sigma_min, sigma_max]. The network sees t = 250 * log(sigma) (float). The state is x_vp = alpha * x_ve.
    """
    n, sigma_min, sigma_max = config.num_train_timesteps, config.sigma_min, config.sigma_max
    if timesteps is None:
        grid = np.arange(0, steps)[::-1] * (n // steps)
    else:
        grid = _given(config, steps, timesteps)
    ramp = grid[::-1] / max(n - 1, 1)  # N = 1 (diffusers: 0 / 0) means sigma_max
    inv_rho_min, inv_rho_max = sigma_min ** (1 / config.rho), sigma_max ** (1 / config.rho)
    sigmas = [*((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** config.rho), sigma_min]  # Karras eq. 5
    stages = []
    for i in range(steps):
        sigma_ve, sigma_next = sigmas[i], sigmas[i + 1]
        alpha, sigma = vp_from_ve(sigma_ve)
        alpha_next = vp_from_ve(sigma_next)[0]
        # after the final step sigma_next = sigma_min, so std = 0 (diffusers, holding sigmas in float32, adds noise
        # of std sqrt(float32(sigma_min)^2 - sigma_min^2) ~ 7e-7 there: a rounding residue, not mirrored)
        sigma_hat = min(max(sigma_next, sigma_min), sigma_max)
        std = config.s_noise * math.sqrt(max(sigma_hat**2 - sigma_min**2, 0.0))
        update = Combination(x=0.0, denoised=(alpha_next,), noise=alpha_next * std)
        timestep = 1000 * 0.25 * math.log(sigma_ve + 1e-44)
        stages.append(Stage(timestep, alpha, sigma, update=update))
    # diffusers starts from sigma_max * noise even when a custom schedule starts lower (its first sigma)
    return Plan(tuple(stages), init_scale=vp_from_ve(sigmas[0])[0] * sigma_max,
                output_scale=1.0 / vp_from_ve(sigmas[-1])[0], integer_timesteps=False)
