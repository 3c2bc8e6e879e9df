"""Euler, Euler ancestral and Heun sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 1; k-diffusion's sample_euler_ancestral) as plans, with diffusers'
EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler conventions.

diffusers runs these samplers on the VE sample x_ve = x / alpha at noise level sigma (= sigma_ve), with the
probability-flow ODE dx_ve / dsigma = (x_ve - denoised) / sigma (Karras et al. 2022, eq. 3 with sigma(t) = t). A VE
step x_ve' = a * x_ve + b * denoised + c * z lands at sigma_next, so in our VP state (x = alpha * x_ve) it is
x' = (alpha_next / alpha) * a * x + alpha_next * b * denoised + alpha_next * c * z (`_to_vp`).

The schedule mirrors diffusers' set_timesteps bit for bit where it matters: its sigmas are float32 values, its
sigma -> timestep interpolation runs on float32 log-sigmas, and its timesteps reach the network as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import SchedulerConfig
from ..plan import Combination, Plan, Stage
from ..schedules import exponential_sigmas, karras_sigmas, sigma_to_t, vp_from_ve
from .common import train_ve_sigmas


def _spaced_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """The timesteps of diffusers' Euler-family set_timesteps (Lin et al. 2023, table 2), float32 [steps].

    Unlike DDIM's, linspace timesteps are not rounded: they are fractional training times.
    """
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + np.float32(config.steps_offset)
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().astype(np.float32) - np.float32(1)


def schedule(config: SchedulerConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' set_timesteps for the three classes: (timesteps [steps], sigmas [steps + 1 or steps + 2]).

    Step i goes from sigmas[i] to sigmas[i + 1] and the network gets timesteps[i]; both float64 arrays holding
    diffusers' float32 values. Fields a class lacks read as that class's fixed behaviour (no Karras sigmas for Euler
    ancestral, no config sigma_min / sigma_max for Heun, ...).
    """
    f = config.fields
    train_sigmas = train_ve_sigmas(config)  # float32 [T]
    log_sigmas = np.log(train_sigmas)  # float32, as diffusers interpolates timesteps in it
    timesteps = _spaced_timesteps(config, steps)
    if f.get("interpolation_type", "linear") == "log_linear":
        # diffusers quirk, mirrored: steps + 1 float32 sigmas from the training sigma_max down to sigma_min, whatever
        # the timesteps; the loop then stops at the training sigma_min (the appended final sigma is never reached)
        sigmas = torch.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), steps + 1, dtype=torch.float32)
        sigmas = sigmas.exp().numpy()
    else:
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if f.get("use_karras_sigmas", False) or f.get("use_exponential_sigmas", False):
        # the new schedule spans the config's sigma_min / sigma_max (Euler only), else the interpolated range; its
        # timesteps are the fractional training times of its sigmas
        for field in ("sigma_min", "sigma_max"):
            if f.get(field) is not None and not f[field] > 0:
                raise ValueError(f"{config.class_name}: {field} must be a positive number or None, got {f[field]!r}")
        sigma_min = float(sigmas[-1]) if f.get("sigma_min") is None else f["sigma_min"]
        sigma_max = float(sigmas[0]) if f.get("sigma_max") is None else f["sigma_max"]
        spaced = karras_sigmas if f.get("use_karras_sigmas", False) else exponential_sigmas
        sigmas = spaced(sigma_min, sigma_max, steps)
        timesteps = sigma_to_t(sigmas, log_sigmas)
    final = float(train_sigmas[0]) if f.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sigmas = np.append(sigmas, final).astype(np.float32)
    if f.get("timestep_type") == "continuous" and f["prediction_type"] == "v_prediction":
        timesteps = (0.25 * torch.from_numpy(sigmas[:-1]).log()).numpy()  # torch's float32 log, as diffusers
    if len(timesteps) > 1 and timesteps[0] == timesteps[1]:
        # diffusers' index_for_timestep would start at the second entry and run off the end of its sigmas
        raise ValueError(f"{config.class_name}: the first timestep {timesteps[0]} repeats (sigma_max="
                         f"{f.get('sigma_max')} lies above the training schedule's largest sigma "
                         f"{float(train_sigmas[-1]):.6g} for more than one step); lower sigma_max")
    return timesteps.astype(np.float32).astype(np.float64), sigmas.astype(np.float64)


def _init_scale(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """alpha_0 * diffusers' init_noise_sigma: sigma_max for linspace / trailing spacing, sqrt(sigma_max^2 + 1) for
    leading (a diffusers convention: the initial sample is then slightly wider than a VE sample at sigma_max), in
    diffusers' float32 arithmetic."""
    sigma_max = torch.tensor(sigmas.max(), dtype=torch.float32)
    init_noise_sigma = (sigma_max**2 + 1) ** 0.5 if config.timestep_spacing == "leading" else sigma_max
    return vp_from_ve(float(sigmas[0]))[0] * float(init_noise_sigma)


def _to_vp(ve: Combination, alpha: float, alpha_next: float) -> Combination:
    """A combination producing x_ve at sigma_next from x_ve at sigma, rewritten for the VP state x = alpha * x_ve."""
    return Combination(
        x=ve.x * alpha_next / alpha, denoised=tuple(alpha_next * d for d in ve.denoised), noise=alpha_next * ve.noise
    )


def _euler(sigma: float, sigma_next: float) -> Combination:
    """x_ve' = x_ve + (x_ve - denoised) / sigma * (sigma_next - sigma) (Karras et al. 2022, Algorithm 1, line 5)."""
    ratio = sigma_next / sigma
    return Combination(x=ratio, denoised=(1.0 - ratio,))


def _stage(timestep: float, sigma: float, **combinations: Combination | None) -> Stage:
    alpha, sigma_vp = vp_from_ve(sigma)
    return Stage(timestep, alpha, sigma_vp, **combinations)


def euler(config: SchedulerConfig, steps: int) -> Plan:
    """First-order Euler steps of the probability-flow ODE along diffusers' EulerDiscreteScheduler sigmas.

    The sample diffusers returns is x_ve at the last sigma reached (0, sigma_min, or with log_linear interpolation
    the training sigma_min), hence output_scale = 1 / alpha there. The optional churn of diffusers' step (s_churn,
    s_tmin, s_tmax, s_noise: Karras et al. 2022, Algorithm 2) is not implemented; its default is no churn.
    """
    timesteps, sigmas = schedule(config, steps)
    alphas = [vp_from_ve(s)[0] for s in sigmas]
    stages = tuple(
        _stage(timesteps[i], sigmas[i], update=_to_vp(_euler(sigmas[i], sigmas[i + 1]), alphas[i], alphas[i + 1]))
        for i in range(steps)
    )
    return Plan(stages, _init_scale(config, sigmas), 1.0 / alphas[steps], integer_timesteps=False)


def euler_ancestral(config: SchedulerConfig, steps: int) -> Plan:
    """Euler ancestral (k-diffusion's sample_euler_ancestral with eta = 1): an Euler step down to sigma_down, then
    fresh noise of std sigma_up, sigma_up = sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2) and
    sigma_down = sqrt(sigma_next^2 - sigma_up^2), so the noise level after the step is sigma_next again.
    diffusers does not implement prediction_type='sample' here, so neither do we.
    """
    if config.prediction_type == "sample":
        raise ValueError("EulerAncestralDiscreteScheduler: prediction_type='sample' is not supported (diffusers does "
                         "not implement it); allowed: 'epsilon', 'v_prediction'")
    timesteps, sigmas = schedule(config, steps)
    alphas = [vp_from_ve(s)[0] for s in sigmas]
    stages = []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        ratio = sigma_down / sigma
        step = Combination(x=ratio, denoised=(1.0 - ratio,), noise=sigma_up)  # noise in the update: stream 2k + 1
        stages.append(_stage(timesteps[i], sigma, update=_to_vp(step, alphas[i], alphas[i + 1])))
    return Plan(tuple(stages), _init_scale(config, sigmas), 1.0 / alphas[steps], integer_timesteps=False)


def _heun(sigma: float, sigma_next: float) -> Combination:
    """Heun's update from x_ve at sigma, denoised at sigma (D1) and at the Euler prediction (D2, newest first):
    x_ve' = x_ve + (d1 + d2) / 2 * dt, d1 = (x_ve - D1) / sigma, d2 = (x_ve + d1 * dt - D2) / sigma_next,
    dt = sigma_next - sigma (Karras et al. 2022, Algorithm 1, lines 7-8), expanded into coefficients."""
    dt = sigma_next - sigma
    d2, d1 = -dt / (2 * sigma_next), -dt / (2 * sigma) * (1 + dt / sigma_next)
    return Combination(x=sigma_next / sigma, denoised=(d2, d1))


def heun(config: SchedulerConfig, steps: int) -> Plan:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) as diffusers' HeunDiscreteScheduler runs it:
    two evaluations per step, the second at the Euler prediction with sigma_next's timestep and input scaling, except
    the final step to sigma = 0, which is a plain Euler step (2 * steps - 1 evaluations).
    """
    timesteps, sigmas = schedule(config, steps)
    alphas = [vp_from_ve(s)[0] for s in sigmas]
    stages = []
    for i in range(steps - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        stages.append(_stage(timesteps[i], sigma))
        predictor = _to_vp(_euler(sigma, sigma_next), alphas[i], alphas[i + 1])
        corrector = _to_vp(_heun(sigma, sigma_next), alphas[i], alphas[i + 1])
        stages.append(_stage(timesteps[i + 1], sigma_next, point=predictor, update=corrector))
    final = _to_vp(_euler(sigmas[-2], sigmas[-1]), alphas[-2], alphas[-1])
    stages.append(_stage(timesteps[-1], sigmas[-2], update=final))
    return Plan(tuple(stages), _init_scale(config, sigmas), 1.0 / alphas[-1], integer_timesteps=False)
