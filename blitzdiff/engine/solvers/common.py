"""Helpers shared by the solver builders: the training schedule of a config and diffusers' timestep spacings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import SchedulerConfig
from ..schedules import alphas_cumprod, training_betas


def train_alpha_bars(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for t = 0 .. num_train_timesteps - 1, float64 [T] (from float32 training betas)."""
    f = config.fields
    betas = training_betas(
        f["beta_schedule"], f["num_train_timesteps"], f["beta_start"], f["beta_end"], f["trained_betas"],
        f.get("rescale_betas_zero_snr", False),
    )
    return alphas_cumprod(betas)


def spaced_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """DDIM / DDPM / LCM-style integer timesteps, descending, int64 [steps] (Lin et al. 2023, table 2)."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + config.steps_offset
    ratio = n / steps  # trailing
    return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1


def custom_timesteps(config: SchedulerConfig, timesteps: Sequence[int]) -> np.ndarray:
    """User-given training timesteps: strictly descending ints in [0, num_train_timesteps)."""
    t = np.asarray(list(timesteps), dtype=np.int64)
    n = config.num_train_timesteps
    if t.ndim != 1 or len(t) == 0:
        raise ValueError("timesteps must be a non-empty sequence of ints")
    if np.any(t[1:] >= t[:-1]):
        raise ValueError(f"timesteps must be strictly descending, got {t.tolist()}")
    if t[0] >= n or t[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {n}) (num_train_timesteps), got {t.tolist()}")
    return t
