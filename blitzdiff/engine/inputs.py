"""Checks of the numbers a user passes to sample(): scales, seeds and labels. Each returns the checked value or
raises a ValueError that says what was wrong and what is allowed, before any work is done."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch

MAX_SEED = 2**63 - 1  # seeds are int64 (blitzdiff.kernels.gaussian_noise hashes their two 32-bit halves)


def finite_number(name: str, value: Any, *, minimum: float | None = None) -> float:
    """A real, finite Python number (not a bool), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """An int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def guidance_values(value: Any, batch: int) -> float | list[float]:
    """guidance_scale for `batch` samples: a finite number, or one per sample (returned as one float when they are
    all equal, so that a uniform list runs exactly as its number)."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return finite_number("guidance_scale", value)
    if isinstance(value, torch.Tensor) or hasattr(value, "dtype"):
        value = torch.as_tensor(value).reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != batch:
        raise ValueError(f"guidance_scale must be a finite number or {batch} of them (one per sample), got {value!r}")
    scales = [finite_number(f"guidance_scale[{i}]", v) for i, v in enumerate(value)]
    return scales[0] if len(set(scales)) == 1 else scales


def integer_values(name: str, value: Any) -> list[int]:
    """An int, or a sequence / integer tensor / integer array of ints, as a list; floats (even integral ones) and
    bools are refused rather than truncated."""
    if isinstance(value, torch.Tensor) or hasattr(value, "dtype"):
        tensor = torch.as_tensor(value)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(f"{name} must be integers, got a {tensor.dtype} tensor")
        return tensor.reshape(-1).tolist()
    items = [value] if isinstance(value, Integral) or not hasattr(value, "__iter__") else list(value)
    bad = [item for item in items if isinstance(item, bool) or not isinstance(item, Integral)]
    if isinstance(value, str) or bad:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {value!r}")
    return [int(item) for item in items]


def seed_values(seeds: Any, batch: int) -> list[int]:
    """The per-sample seeds [batch]: None means 0, 1, ..., batch - 1; an int s means s, s + 1, ..., s + batch - 1;
    otherwise one int per sample. Every seed must be in 0 .. 2**63 - 1."""
    if seeds is None:
        seeds = 0
    if isinstance(seeds, Integral) and not isinstance(seeds, bool):
        if not 0 <= seeds <= MAX_SEED - (batch - 1):
            raise ValueError(f"seeds={seeds}: an int s gives samples the seeds s .. s + {batch - 1}, which must lie "
                             f"in 0 .. 2**63 - 1")
        return list(range(int(seeds), int(seeds) + batch))
    values = integer_values("seeds", seeds)
    if len(values) != batch:
        raise ValueError(f"seeds must be an int or a sequence of {batch} ints (one per sample), got {len(values)}")
    outside = [s for s in values if not 0 <= s <= MAX_SEED]
    if outside:
        raise ValueError(f"seeds must lie in 0 .. 2**63 - 1, got {outside[:3]}")
    return values
