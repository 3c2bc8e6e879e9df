"""Sinusoidal timestep embedding (Vaswani et al. 2017, as diffusion models use it).

`timestep_embedding_ref` is the specification, with diffusers' `get_timestep_embedding` conventions (which cover
the original DiT's too: flip_sin_to_cos=True, downscale_freq_shift=0). Fused kernels (with the first linear layer
and SiLU) join it as backends in issue 4; until then "ref" is the only backend.
"""

import math

import torch
from torch import Tensor

from ._backends import check_backend

BACKENDS = ("ref",)


def timestep_embedding_ref(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor:
    """timesteps: [B] (int or float) -> float32 [B, dim].

    freq_j = max_period ** (-j / (half - downscale_freq_shift)), j < half = dim // 2; emb = scale * t * freq;
    out = [sin(emb), cos(emb)] ([cos, sin] with flip_sin_to_cos), zero-padded by one column when dim is odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # [half]
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    backend: str = "ref",
) -> Tensor:
    """timestep_embedding_ref's result computed by `backend` (see BACKENDS)."""
    check_backend("timestep_embedding", backend, BACKENDS)
    return timestep_embedding_ref(timesteps, dim, flip_sin_to_cos=flip_sin_to_cos,
                                  downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
