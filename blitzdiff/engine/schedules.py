"""Noise schedules: host math, computed once per (config, steps).

Conventions (shared by every solver): a noisy sample is x = alpha * x0 + sigma * eps with alpha^2 + sigma^2 = 1
(variance preserving, "VP"). The k-diffusion / EDM noise level is sigma_ve = sigma / alpha, and
x_ve = x / alpha = x0 + sigma_ve * eps.

The training betas and their cumulative product are built in float32 exactly as diffusers builds them: those
float32 values *are* the schedule the network was trained on. Everything derived from them is float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: betas discretizing alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # shift to 0 at T, keep value at 0
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def training_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The training betas, float32 [num_train_timesteps], as diffusers defines them."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(betas: torch.Tensor) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s): float32 cumprod as in training, returned as float64 [T]."""
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: n noise levels from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n noise levels uniformly spaced in log(sigma), from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def polyexponential_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 1.0) -> np.ndarray:
    """k-diffusion's polyexponential schedule: log(sigma) interpolated along a ramp**rho (rho=1: exponential)."""
    ramp = np.linspace(1, 0, n) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log(sigma) (diffusers/k-diffusion).

    sigma: [n] VE noise levels; log_sigmas: [T] log of the training VE sigmas, increasing with t.
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # [T, n]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def vp_from_ve(sigma_ve: float) -> tuple[float, float]:
    """(alpha, sigma) of the VP sample at VE noise level sigma_ve (inf maps to pure noise)."""
    if math.isinf(sigma_ve):
        return 0.0, 1.0
    alpha = 1.0 / math.sqrt(1.0 + sigma_ve * sigma_ve)
    return alpha, sigma_ve * alpha


def vp_from_alpha_bar(alpha_bar: float) -> tuple[float, float]:
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar))."""
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
