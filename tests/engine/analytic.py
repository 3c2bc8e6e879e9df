"""Test helper: diffusion problems whose denoiser, probability-flow ODE and sampler moments are known exactly.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) (one component: a Gaussian). For the VE noisy sample x_ve = x0 + sigma * n
the posterior is again a mixture, so the optimal denoiser E[x0 | x_ve] is closed form (Karras et al. 2022, eq. 3
with p_data a mixture), and so is every parameterization of the network that would be trained to optimality:
epsilon, v (Salimans & Ho 2022) and x0. `AnalyticNetwork` is that network behind diffusers' UNet interface
fn(x_in, t): it reads the noise level from the diffusers timestep exactly as the scheduler means it, so a correct
sampler driven by it solves the true probability-flow ODE (Song et al. 2021, eq. 13) of the data:

    dx_ve / dsigma = (x_ve - D(x_ve, sigma)) / sigma.

For a Gaussian its solution is closed form, x_ve(sigma) - mu = (x_ve(sigma_0) - mu) * sqrt((s^2 + sigma^2) /
(s^2 + sigma_0^2)); for a mixture `Mixture.flows` integrates it with RK4 in log(sigma), in float64.

For Gaussian data every denoiser is affine in the state, so a plan (any sampler, stochastic ones included) maps
the initial and per-stage noises linearly to its output: `plan_moments` computes the output's exact law on the
host, and `final_level` the noise level a plan lands on (run on point-mass data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from blitzdiff.engine.plan import Combination, Plan

RK4_STEP = 0.01  # the largest RK4 step in log(sigma) of Mixture.flows: error < 1e-9 here


@dataclass(frozen=True)
class Mixture:
    """x0 ~ sum_k weights[k] * N(means[k], stds[k]^2 I); means [K][C] for samples shaped [B, C]."""

    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    def denoise(self, x_ve: torch.Tensor, sigma_ve: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma_ve * n = x_ve]. x_ve [B, C] float64; sigma_ve [B] or a 0-dim tensor."""
        sigma2 = torch.as_tensor(sigma_ve, dtype=x_ve.dtype).reshape(-1, 1, 1) ** 2  # [B or 1, 1, 1]
        mu = torch.tensor(self.means, dtype=x_ve.dtype)[None]  # [1, K, C]
        var = torch.tensor(self.stds, dtype=x_ve.dtype).reshape(1, -1, 1) ** 2  # [1, K, 1]
        total = var + sigma2  # [B, K, 1]: each component's variance of x_ve
        diff = x_ve[:, None, :] - mu  # [B, K, C]
        channels = x_ve.shape[1]
        log_p = (torch.tensor(self.weights, dtype=x_ve.dtype).log()[None]
                 - 0.5 * channels * total[..., 0].log() - 0.5 * (diff**2).sum(-1) / total[..., 0])  # [B, K]
        # softmax over components, spelled out: torch.softmax parallelizes even tiny rows, and its thread wake-ups
        # cost 100x the math on a loaded machine
        p = (log_p - log_p.amax(dim=1, keepdim=True)).exp()
        responsibility = (p / p.sum(dim=1, keepdim=True))[..., None]  # [B, K, 1]
        return (responsibility * (mu + var / total * diff)).sum(1)  # [B, C]

    def flow(self, x_ve: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The probability-flow ODE solution at sigma_to from x_ve [B, C] at sigma_from (both > 0), float64."""
        return self.flows(x_ve, sigma_from, [sigma_to])[0]

    def flows(self, x_ve: torch.Tensor, sigma_from: float, levels: list[float]) -> list[torch.Tensor]:
        """The ODE solution at each of `levels` (all below sigma_from), in one pass through them.

        Closed form for one component; otherwise classic RK4 in u = log(sigma), dx/du = x - D(x, e^u), with steps
        of at most `RK4_STEP` in u, whose error is below 1e-9 here (test_convergence checks it).
        """
        if len(self.weights) == 1:
            mu, s2 = torch.tensor(self.means[0], dtype=x_ve.dtype), self.stds[0] ** 2
            return [mu + (x_ve - mu) * math.sqrt((s2 + s**2) / (s2 + sigma_from**2)) for s in levels]
        solved = {}
        for sigma in sorted(set(levels), reverse=True):
            steps = max(1, math.ceil(abs(math.log(sigma_from / sigma)) / RK4_STEP))
            x_ve, sigma_from = self.rk4(x_ve, sigma_from, sigma, steps), sigma
            solved[sigma] = x_ve
        return [solved[s] for s in levels]

    def rk4(self, x: torch.Tensor, sigma_from: float, sigma_to: float, steps: int) -> torch.Tensor:
        u, h = math.log(sigma_from), (math.log(sigma_to) - math.log(sigma_from)) / steps

        def slope(x: torch.Tensor, u: float) -> torch.Tensor:
            return x - self.denoise(x, torch.tensor(math.exp(u), dtype=x.dtype))

        for i in range(steps):
            u_i = u + i * h
            k1 = slope(x, u_i)
            k2 = slope(x + 0.5 * h * k1, u_i + 0.5 * h)
            k3 = slope(x + 0.5 * h * k2, u_i + 0.5 * h)
            k4 = slope(x + h * k3, u_i + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


def gaussian(mean: tuple[float, ...], std: float) -> Mixture:
    return Mixture((1.0,), (mean,), (std,))


def uniform_log_snr_betas(num_train_timesteps: int = 1000, sigma_min: float = 0.005, sigma_max: float = 80.0):
    """Training betas whose VE noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) are geometric in t,
    from sigma_min (t = 0) to sigma_max (t = T - 1): log-SNR uniform in t. Passed as diffusers' `trained_betas`.

    Why: on diffusers' "linear" betas, sigma_t^2 ~ beta_start * (t + 1) near t = 0, so the last step of any
    t-uniform grid (from t = T/N - 1 down to t = 0) has a log-SNR length ~ log(T/N) / 2 that does not shrink
    like 1/N, and its local error (~ sigma_last^2 ~ 1/N) caps every solver at order 1. On a log-SNR-uniform
    schedule every step, the last one included, has length O(1/N).
    """
    sigma = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), num_train_timesteps))
    alpha_bar = 1.0 / (1.0 + sigma**2)
    betas = 1.0 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])
    return betas.tolist()


class AnalyticNetwork:
    """The optimal network fn(x_in, t) for `data` behind diffusers' UNet interface.

    x_in is what diffusers feeds the UNet: the VP sample x = alpha * x0 + sigma * eps for every non-consistency
    scheduler (the Euler family's scale_model_input maps x_ve to exactly that). The noise level is read from t:
    an integer t means alpha_bar = alphas_cumprod[t]; a float t (the sigma-interpolated schedulers) means
    log(sigma_ve) linearly interpolated over the training log-sigmas, the exact inverse of diffusers' / blitzdiff's
    sigma_to_t. Returns the exact epsilon, v or x0 prediction, [B, C] float64.
    """

    def __init__(self, data: Mixture, alpha_bars: np.ndarray, prediction_type: str = "epsilon"):
        self.data, self.prediction_type = data, prediction_type
        self.alpha_bars = torch.tensor(alpha_bars, dtype=torch.float64)
        self.log_sigmas = ((1 - self.alpha_bars) / self.alpha_bars).sqrt().log()

    def levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) [B] of the VP sample at diffusers timestep t [B]."""
        if not t.is_floating_point():
            alpha_bar = self.alpha_bars[t]
            return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        t = t.double()
        low = t.floor().clamp(0, len(self.log_sigmas) - 2)
        w = t - low
        low = low.long()
        sigma_ve = ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()
        alpha = (1 + sigma_ve**2).rsqrt()
        return alpha, sigma_ve * alpha

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v[:, None] for v in self.levels(t))  # [B, 1]
        x0 = self.data.denoise(x_in / alpha, (sigma / alpha)[:, 0])
        eps = (x_in - alpha * x0) / sigma
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return alpha * eps - sigma * x0
        assert self.prediction_type == "sample"
        return x0


class ConsistencyNetwork:
    """The exact consistency model of Gaussian data behind diffusers' CMStochasticIterativeScheduler interface.

    The consistency function maps x_ve at sigma along the ODE to sigma_min (Song et al. 2023, eq. 3):
    f(x_ve, sigma) = mu + (x_ve - mu) * sqrt((s^2 + sigma_min^2) / (s^2 + sigma^2)). diffusers feeds the network
    c_in * x_ve = x_ve / sqrt(sigma^2 + sigma_data^2) and t = 250 * log(sigma), and forms
    f = c_skip * x_ve + c_out * F with the boundary-condition scalings; this returns the F that makes f exact.
    """

    def __init__(self, mean: tuple[float, ...], std: float, sigma_min: float = 0.002, sigma_data: float = 0.5):
        self.mean, self.std, self.sigma_min, self.sigma_data = mean, std, sigma_min, sigma_data

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.double() / 250.0).exp()[:, None]  # [B, 1]
        sd2, s2 = self.sigma_data**2, self.std**2
        x_ve = x_in * (sigma**2 + sd2).sqrt()
        mu = torch.tensor(self.mean, dtype=x_in.dtype)
        f = mu + (x_ve - mu) * ((s2 + self.sigma_min**2) / (s2 + sigma**2)).sqrt()
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + sd2).sqrt()
        # at sigma == sigma_min, c_skip == 1 and f == x_ve: any output is exact, 0 avoids 0 / 0
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return torch.where(c_out == 0, torch.zeros_like(x_in), (f - c_skip * x_ve) / safe)


@dataclass
class Affine:
    """A scalar random variable c + sum_i a[i] * xi_i over independent unit Gaussians xi (one coordinate)."""

    const: float
    coef: np.ndarray

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.const + other.const, self.coef + other.coef)

    def __mul__(self, k: float) -> Affine:
        return Affine(k * self.const, k * self.coef)

    __rmul__ = __mul__

    @property
    def variance(self) -> float:
        return float(self.coef @ self.coef)


def plan_moments(plan: Plan, denoisers: list[tuple[float, float]], init: Affine | None = None) -> Affine:
    """The exact law of one coordinate of a plan's output when stage k's denoiser is affine, D(x) = a_k + b_k * x
    (`denoisers[k] = (a_k, b_k)`), as for Gaussian data: a symbolic run_plan over the initial noise (source 0;
    `init` replaces the default initial state init_scale * noise) and the stage noises (point: source 1 + 2k,
    update: 2 + 2k), all independent unit Gaussians.
    """
    sources = 1 + 2 * len(plan.stages)

    def unit(i: int) -> Affine:
        coef = np.zeros(sources)
        coef[i] = 1.0
        return Affine(0.0, coef)

    def combine(c: Combination, source: int) -> Affine:
        out = c.x * x
        for j, coef in enumerate(c.denoised):
            out = out + coef * history[-1 - j]
        for j, coef in enumerate(c.points):
            out = out + coef * points[-1 - j]
        if c.raw != 0.0:
            out = out + c.raw * history[-1]
        return out + c.noise * unit(source)

    x = unit(0) * plan.init_scale if init is None else init
    history: list[Affine] = []
    points: list[Affine] = []
    for k, stage in enumerate(plan.stages):
        point = x if stage.point is None else combine(stage.point, 1 + 2 * k)
        a, b = denoisers[k]
        history.append(Affine(a, np.zeros(sources)) + b * point)
        points.append(point)
        if stage.update is not None:
            x = combine(stage.update, 2 + 2 * k)
    return x * plan.output_scale


def posterior_affine(alpha: float, sigma: float, std: float) -> tuple[float, float]:
    """E[x0 | x] = mu * a + b * x for x0 ~ N(mu, std^2) and the VP sample x = alpha * x0 + sigma * eps."""
    b = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    return 1.0 - alpha * b, b


def consistency_affine(alpha: float, sigma: float, std: float, sigma_min: float) -> tuple[float, float]:
    """The exact consistency function of N(mu, std^2) data as mu * a + b * x for the VP sample x."""
    ratio = math.sqrt((std**2 + sigma_min**2) / (std**2 + (sigma / alpha) ** 2))
    return 1.0 - ratio, ratio / alpha


def final_level(plan: Plan) -> float:
    """The VE noise level of the plan's output. On data that is a point mass at x0 = 1 the exact denoiser is D = 1
    at every noise level, and the state at the first stage's level is alpha_0 + sigma_0 * eps; every step of a
    sampler exact on such data (all ODE solvers, and SDE steps that read no past noise predictions) keeps it of
    the form c * 1 + (noise of variance v) and lands exactly on its target level sqrt(v) / c (0: a clean sample).

    Tracked on the host: a deterministic plan's quantities are c + a * eps, one pair each (past evaluation points
    included); a stochastic one without points needs only (c, v); otherwise plan_moments (the points' noise is
    correlated with the state's).
    """
    first = plan.stages[0]
    uses_points = any(c is not None and c.points for s in plan.stages for c in (s.point, s.update))
    if not plan.stochastic:
        x, points = (first.alpha, first.sigma), []  # (c, a): c * 1 + a * eps

        def combine(c: Combination) -> tuple[float, float]:
            read = [(w, points[-1 - j]) for j, w in enumerate(c.points)]
            const = c.x * x[0] + sum(c.denoised) + c.raw + sum(w * p[0] for w, p in read)
            return const, c.x * x[1] + sum(w * p[1] for w, p in read)

        for stage in plan.stages:
            points.append(x if stage.point is None else combine(stage.point))
            if stage.update is not None:
                x = combine(stage.update)
        return float(abs(x[1]) / x[0])
    if uses_points:
        init = Affine(first.alpha, np.zeros(1 + 2 * len(plan.stages)))
        init.coef[0] = first.sigma
        out = plan_moments(plan, [(1.0, 0.0)] * len(plan.stages), init)
        return math.sqrt(out.variance) / out.const
    mean, var = first.alpha, first.sigma**2
    for stage in plan.stages:
        c = stage.update
        if c is not None:
            mean = c.x * mean + sum(c.denoised) + c.raw
            var = c.x**2 * var + c.noise**2
    return float(math.sqrt(var) / mean)
