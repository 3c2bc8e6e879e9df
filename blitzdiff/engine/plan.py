"""A sampler as data: the float64 coefficient plan that the loop interprets (ARCHITECTURE.md contract 2).

Every sampler in blitzdiff is compiled, on the host and once, into a `Plan`: a sequence of stages, one per network
evaluation. Stage k evaluates the denoiser D at a point that is a linear combination of the state x, the denoised
history and fresh noise, then (optionally) replaces the state by another such combination. First-step, final-step,
lower-order-final and sigma_next == 0 special cases are all resolved here, so the loop never branches on data.

State convention (see schedules.py): x = alpha * x0 + sigma * eps with alpha^2 + sigma^2 = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def _add(a: tuple[float, ...], b: tuple[float, ...], scale: float) -> tuple[float, ...]:
    """a + scale * b for coefficient tuples of different lengths (missing entries are 0)."""
    width = max(len(a), len(b))
    a, b = a + (0.0,) * (width - len(a)), b + (0.0,) * (width - len(b))
    return tuple(x + scale * y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Combination:
    """x * self.x + sum_j self.denoised[j] * D[-1 - j] + sum_j self.points[j] * P[-1 - j]
    + self.raw * D_raw[-1] + self.noise * z.

    D is the history of (post-processed) denoised estimates, newest last; P the history of the points they were
    evaluated at (noise-prediction solvers need eps_j = (P_j - alpha_j * D_j) / sigma_j of past steps); D_raw[-1]
    the newest estimate before clipping / thresholding (only DDIM's "direction pointing to x_t" uses it); z is
    fresh unit Gaussian noise, drawn per sample from its seed.
    """

    x: float = 1.0
    denoised: tuple[float, ...] = ()
    raw: float = 0.0
    noise: float = 0.0
    points: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # Builders compute in numpy float64; the loop must see plain Python floats so that torch.compile treats
        # them as constants (a numpy scalar in `coef != 0.0` breaks fullgraph tracing).
        for name in ("x", "raw", "noise"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("denoised", "points"):
            object.__setattr__(self, name, tuple(float(c) for c in getattr(self, name)))

    def then(self, outer: Combination) -> Combination:
        """The combination `outer` applied to the result of `self` (no new evaluation in between).

        Both sides share the same history; noise may appear in only one of them (each stage draws once).
        """
        assert self.noise == 0.0 or outer.noise == 0.0, "composed combinations may draw noise only once"
        return Combination(
            x=outer.x * self.x,
            denoised=_add(outer.denoised, self.denoised, outer.x),
            raw=outer.raw + outer.x * self.raw,
            noise=outer.noise + outer.x * self.noise,
            points=_add(outer.points, self.points, outer.x),
        )


@dataclass(frozen=True)
class Stage:
    """One network evaluation.

    timestep: what the network receives at this evaluation (diffusers' timestep value).
    alpha, sigma: the evaluation point's noise level, x = alpha * x0 + sigma * eps.
    point: where D is evaluated; None means at the state x itself.
    update: the state after this evaluation; None leaves it unchanged (e.g. Heun's first stage).
    """

    timestep: float
    alpha: float
    sigma: float
    point: Combination | None = None
    update: Combination | None = None

    def __post_init__(self) -> None:
        for name in ("timestep", "alpha", "sigma"):  # plain Python floats, as in Combination
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class Plan:
    """stages: one per network evaluation. init_scale: initial state = init_scale * unit noise (diffusers'
    init_noise_sigma, mapped into the VP state). output_scale: returned sample = output_scale * final state (maps
    back to the space the diffusers scheduler returns its sample in). integer_timesteps: whether the network gets
    int64 timesteps (discrete schedulers) or float32 ones (sigma-interpolated schedulers).
    """

    stages: tuple[Stage, ...]
    init_scale: float = 1.0
    output_scale: float = 1.0
    integer_timesteps: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_scale", float(self.init_scale))
        object.__setattr__(self, "output_scale", float(self.output_scale))
        object.__setattr__(self, "_memo", {})  # not a field: outside equality, hashing and repr

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """compute(), once per plan and key: what a loop derives from its plan (preconditioning scalars, timestep
        tables, fused stages). Plans are cached and shared by every run of a sampler (engine.solvers), so each run
        after the first finds them here; a value must never be mutated. Two threads may both compute a missing key;
        one result is kept. While torch traces the caller (torch.compile, torch.export, ONNX export) nothing is
        kept or read: the value belongs in the traced graph (with a symbolic batch, say), not in the plan."""
        if torch.compiler.is_compiling():
            return compute()
        try:
            return self._memo[key]
        except KeyError:
            return self._memo.setdefault(key, compute())

    @property
    def history(self) -> int:
        """How many past denoised estimates (and evaluation points) the loop must keep (at least 1); read by every
        run, computed from every stage once (memo)."""
        return self.memo("history", lambda: max([1, *(max(len(c.denoised), len(c.points)) for s in self.stages
                                                      for c in (s.point, s.update) if c is not None)]))

    @property
    def stochastic(self) -> bool:
        return any(c.noise != 0.0 for s in self.stages for c in (s.point, s.update) if c is not None)
