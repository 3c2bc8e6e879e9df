"""Per-sample, counter-based Gaussian noise (ARCHITECTURE.md contract 4).

Noise for sample i is a pure function of (seed_i, stream, element index): a 32-bit integer hash evaluated with
ordinary tensor ops, then Box-Muller. So sample i gets the same noise whatever the batch size, batch composition or
number of devices; there is no generator state to advance, capture or restore; and seeds are a device tensor, so a
captured CUDA graph or a compiled loop takes new seeds by a copy into a static buffer.

The 32-bit multiply is done in 16-bit halves so every intermediate fits in int64 without overflow (torch has no
wrapping uint32 multiply on every backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32); every intermediate stays below 2**49."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """'lowbias32' (C. Wellons, hash-prospector): a bijective 32-bit avalanche hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def seed_tensor(seeds: int | Sequence[int] | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Seeds as an int64 tensor [batch]: an int s means s, s+1, ..., s+batch-1; None means 0, 1, ..., batch-1."""
    if seeds is None:
        seeds = 0
    if isinstance(seeds, int):
        if seeds < 0:
            raise ValueError(f"seeds must be non-negative integers, got {seeds}")
        return torch.arange(seeds, seeds + batch, dtype=torch.int64, device=device)
    tensor = torch.as_tensor(seeds, dtype=torch.int64).to(device)
    if tensor.shape != (batch,):
        raise ValueError(f"seeds must be an int or a sequence of {batch} ints (one per sample), got shape "
                         f"{tuple(tensor.shape)}")
    return tensor


def gaussian(seeds: torch.Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Unit Gaussian noise [B, *shape]; row i depends only on (seeds[i], stream).

    seeds: int64 [B] (non-negative, < 2**63); stream: a host int naming the draw (e.g. the stage), < 2**31.
    """
    count = math.prod(shape)
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key1 = _mix32(seed_lo ^ _mix32(torch.full_like(seeds, stream)))  # [B]
    key2 = _mix32(seed_hi ^ _mix32((key1 + 0x9E3779B9) & _MASK32))  # [B]
    counter = torch.arange(2 * count, dtype=torch.int64, device=seeds.device)  # [2N]: two uniforms per normal
    bits = _mix32(_mix32(counter[None, :] ^ key1[:, None]) ^ key2[:, None])  # [B, 2N]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24-bit uniforms in (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, :count]))
    normal = radius * torch.cos((2.0 * math.pi) * uniform[:, count:])  # Box-Muller, cosine branch
    return normal.reshape(seeds.shape[0], *shape).to(dtype)
