"""Helpers shared by the solver builders: the training schedule of a config, diffusers' timestep spacings, and the
model outputs of multistep solvers as plan combinations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import SchedulerConfig
from ..plan import Combination
from ..schedules import alphas_cumprod, exponential_sigmas, karras_sigmas, sigma_to_t, training_betas


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


def train_ve_sigmas(config: SchedulerConfig) -> np.ndarray:
    """Training VE noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0 .. T - 1, float32 [T], computed
    in float32 exactly as diffusers' sigma-based schedulers (Euler, Heun, DPM-Solver, UniPC) hold them: with torch's
    float32 `** 0.5`, which on CPU is not always correctly rounded (1 ulp off numpy's sqrt for some t).

    With rescale_betas_zero_snr the terminal alpha_bar (exactly 0 after rescaling) is set to 2**-24, as diffusers
    does ("FP16 smallest positive subnormal"), so sigma_max = 4096 stays finite.
    """
    alpha_bars = torch.from_numpy(train_alpha_bars(config)).float()
    if config.fields.get("rescale_betas_zero_snr", False):
        alpha_bars[-1] = 2.0**-24
    return (((1 - alpha_bars) / alpha_bars) ** 0.5).numpy()


def dpm_schedule(
    config: SchedulerConfig, steps: int, *, round_karras_timesteps: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler set_timesteps: (timesteps, sigmas).

    timesteps: int64 [N], what the network gets at step i; sigmas: VE noise levels float64 [N + 1] holding
    diffusers' float32 values, step i going from sigmas[i] to sigmas[i + 1] (the last one is final_sigmas_type's:
    0 or the training sigma_min). N is steps except with trailing spacing and lambda_min_clipped, which shortens it.
    The training tables are built with torch float32 ops exactly as diffusers builds them (torch's float32 sqrt and
    numpy's differ in the last bit for some entries), so Karras / exponential timesteps interpolated in them round
    and truncate the same way. round_karras_timesteps: multistep rounds its Karras timesteps except for
    squaredcos_cap_v2, singlestep always does; the int64 cast truncates the rest (and every exponential one).
    A missing field reads as the singlestep class's fixed behaviour (linspace spacing, no zero-SNR rescaling).
    """
    f = config.fields
    n = f["num_train_timesteps"]
    alpha_bars = torch.from_numpy(train_alpha_bars(config)).float()  # exact: float32 values
    if f.get("rescale_betas_zero_snr", False):
        alpha_bars[-1] = 2.0**-24  # diffusers: "FP16 smallest positive subnormal", so the first sigma is finite
    train_sigmas = (((1 - alpha_bars) / alpha_bars) ** 0.5).numpy()  # float32 [T], increasing with t
    log_sigmas = np.log(train_sigmas)  # float32, as diffusers interpolates timesteps in it
    # lambda_min_clipped: the schedule starts at the largest t whose float32 lambda(t) = log(alpha / sigma) is still
    # >= the clip (torch.searchsorted on the flipped, increasing lambda_t), for the cosine schedule's stability
    lambdas = torch.log(alpha_bars.sqrt()) - torch.log((1 - alpha_bars).sqrt())
    last = n - int(torch.searchsorted(torch.flip(lambdas, [0]), f["lambda_min_clipped"]))
    spacing = f.get("timestep_spacing", "linspace")  # Lin et al. 2023, table 2
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + f["steps_offset"]
    else:  # trailing: the stride is n / steps even when clipped
        timesteps = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
    if f["use_karras_sigmas"] or f["use_exponential_sigmas"]:
        convert = karras_sigmas if f["use_karras_sigmas"] else exponential_sigmas
        sigmas = convert(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
        t = sigma_to_t(sigmas, log_sigmas)  # from the float64 sigmas, before their float32 rounding below
        if f["use_karras_sigmas"] and round_karras_timesteps:
            t = np.round(t)
        timesteps = np.trunc(t).astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(n), train_sigmas)
    sigma_last = float(train_sigmas[0]) if f["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32).astype(np.float64)
    if len(timesteps) > 1 and timesteps[0] == timesteps[1]:
        # diffusers' index_for_timestep then starts at the second entry and runs off the end of its sigmas
        raise ValueError(f"{config.class_name}: {steps} steps repeat the first timestep {timesteps[0]} (diffusers "
                         "then skips the first noise level and fails at the last step); use fewer steps or another "
                         "timestep_spacing / sigma schedule")
    return timesteps, sigmas


def _trimmed(coefficients: list[float]) -> tuple[float, ...]:
    """Without trailing zeros: a history entry with weight 0 is never read, so the plan need not keep it."""
    while coefficients and coefficients[-1] == 0.0:
        coefficients.pop()
    return tuple(coefficients)


def linear(*terms: tuple[float, Combination]) -> Combination:
    """sum_k w_k * c_k over combinations of the same state and histories."""
    denoised = [0.0] * max(len(c.denoised) for _, c in terms)
    points = [0.0] * max(len(c.points) for _, c in terms)
    for w, c in terms:
        for j, d in enumerate(c.denoised):
            denoised[j] += w * d
        for j, p in enumerate(c.points):
            points[j] += w * p
    return Combination(x=sum(w * c.x for w, c in terms), denoised=_trimmed(denoised),
                       raw=sum(w * c.raw for w, c in terms), noise=sum(w * c.noise for w, c in terms),
                       points=_trimmed(points))


def denoised_estimate(age: int) -> Combination:
    """D of the evaluation `age` evaluations before the newest (a data-prediction model output)."""
    return Combination(x=0.0, denoised=(0.0,) * age + (1.0,))


def noise_estimate(age: int, alpha: float, sigma: float) -> Combination:
    """eps = (P - alpha * D) / sigma of the evaluation `age` evaluations before the newest, at its point P and noise
    level (alpha, sigma): the noise-prediction model output, exactly (also of a clipped / thresholded D, which
    diffusers converts back to eps the same way)."""
    pad = (0.0,) * age
    return Combination(x=0.0, denoised=(*pad, -alpha / sigma), points=(*pad, 1.0 / sigma))


def at_state(c: Combination) -> Combination:
    """c with the newest evaluation point read as the state: for a stage evaluated at its state (point None) whose
    update has not moved it yet, saving the loop one term."""
    if not c.points:
        return c
    return Combination(x=c.x + c.points[0], denoised=c.denoised, raw=c.raw, noise=c.noise,
                       points=_trimmed([0.0, *c.points[1:]]))
