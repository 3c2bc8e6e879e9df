"""Sinusoidal timestep embedding (Vaswani et al. 2017, as diffusion models use it), alone and with the time MLP.

`timestep_embedding_ref` is the specification, with diffusers' `get_timestep_embedding` conventions (which cover
the original DiT's too: flip_sin_to_cos=True, downscale_freq_shift=0). `timestep_mlp_ref` adds the time MLP every
UNet and DiT puts after it (diffusers' TimestepEmbedding: linear_1, SiLU, linear_2, on the embedding cast to the
weights' dtype). Two ops, `blitzdiff::timestep_embedding` and `blitzdiff::timestep_mlp`; their kernels read a
frequency table computed once per (dim, shift, max_period, device) by the spec's own torch ops (so the same
bits) and cached, instead of ~5 ops per call. "cpu" / "cuda": one C++ / CUDA pass for the embedding (the MLP's
matmuls stay torch's); "triton": the embedding, and for the MLP the embedding, linear_1 and SiLU fused in one
kernel (linear_2 a torch matmul). "auto" picks the fastest backend built for the device, per call.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import (
    check_backend,
    check_kernel_support,
    choose_backend,
    cpu_kernel,
    device_guard,
    eager_cpu,
    profiled,
    refuse_grad,
)
from ._library import define, launch

BACKENDS = ("ref", "cpu", "cuda", "triton", "auto")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The embedding kernels write float32 from any real timesteps; the MLP's weights may be of these dtypes.
EMBEDDING_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32,), "triton": (torch.float32,)}
MLP_DTYPES = {"cpu": _FLOATING, "cuda": _FLOATING, "triton": (torch.float16, torch.bfloat16, torch.float32)}
_TIMESTEP_DTYPES = {torch.int64: "int64", torch.int32: "int32", torch.float32: "float32", torch.float64: "float64"}
_TABLES: dict[tuple, Tensor] = {}  # (half, shift, max_period, device) -> frequency table, oldest first
_MAX_TABLES = 64


def frequencies(half: int, downscale_freq_shift: float, max_period: float, device: torch.device) -> Tensor:
    """freq_j = max_period ** (-j / (half - downscale_freq_shift)), float32 [half], computed as the spec does."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


def frequency_table(half: int, downscale_freq_shift: float, max_period: float, device: torch.device) -> Tensor:
    """frequencies(...), computed once per argument tuple and kept (the 64 most recent tuples). A table first
    needed during CUDA graph capture is computed inside the graph and not kept: it lives in the graph's pool."""
    key = (half, float(downscale_freq_shift), float(max_period), device)
    table = _TABLES.get(key)
    if table is None:
        table = frequencies(half, downscale_freq_shift, max_period, device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_TABLES) >= _MAX_TABLES:
                del _TABLES[next(iter(_TABLES))]
            _TABLES[key] = table
    return table


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
    freqs = frequencies(half, downscale_freq_shift, max_period, timesteps.device)  # [half]
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def timestep_mlp_ref(
    timesteps: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *, flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: float = 10000.0,
) -> Tensor:
    """linear_2(SiLU(linear_1(embedding))): timesteps [B]; w1 [H, dim], b1 [H], w2 [O, H], b2 [O] -> [B, O] of w1's
    dtype (the embedding is cast to it first, as diffusers' UNets and DiT do)."""
    emb = timestep_embedding_ref(timesteps, w1.shape[1], flip_sin_to_cos=flip_sin_to_cos,
                                 downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
    return F.linear(F.silu(F.linear(emb.to(w1.dtype), w1, b1)), w2, b2)  # [B, O]


def _check_timesteps(op: str, timesteps: Tensor, backend: str) -> None:
    check_backend(op, backend, BACKENDS)
    if timesteps.dim() != 1 or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise ValueError(f"{op}: timesteps must be a 1-D real tensor [B], got {timesteps.dtype} of shape "
                         f"{tuple(timesteps.shape)}")


def _readable(timesteps: Tensor) -> Tensor:
    """Timesteps of a dtype the kernels read; the narrower ones (int16, float16, ...) become float32, exactly."""
    return timesteps if timesteps.dtype in _TIMESTEP_DTYPES else timesteps.float()


def _embed(timesteps: Tensor, dim: int, flip: bool, shift: float, scale: float, max_period: float,
           backend: str) -> Tensor:
    """The float32 [B, dim] embedding by a compiled backend (inputs checked)."""
    timesteps = _readable(timesteps)
    out = torch.empty((timesteps.shape[0], dim), dtype=torch.float32, device=timesteps.device)
    if out.numel() == 0:
        return out
    freqs = frequency_table(dim // 2, shift, max_period, timesteps.device)
    if backend == "triton":
        from .triton import timestep_embedding as triton_kernels  # lazy: triton is optional

        with device_guard(out.device):
            triton_kernels.timestep_embedding(out, timesteps, freqs, flip, scale)
        return out
    launch("timestep_embedding", backend, out.device, out.data_ptr(), timesteps.data_ptr(), timesteps.stride(0),
           _TIMESTEP_DTYPES[timesteps.dtype], freqs.data_ptr(), out.shape[0], dim, flip, scale, threaded=True,
           keep=(out, timesteps, freqs))  # keep: a CPU graph capture records the CPU call
    return out


def _check_embedding(timesteps: Tensor, dim: int, backend: str) -> None:
    _check_timesteps("timestep_embedding", timesteps, backend)
    if dim < 0:
        raise ValueError(f"timestep_embedding: dim must be >= 0, got {dim}")
    check_kernel_support("timestep_embedding", backend, timesteps.device, torch.float32, EMBEDDING_DTYPES)


def _embedding_kernel(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float,
                      max_period: float, *, backend: str) -> Tensor:
    _check_embedding(timesteps, dim, backend)
    if backend == "auto":
        backend = choose_backend(timesteps.device, torch.float32, EMBEDDING_DTYPES, ("cuda", "triton", "cpu"),
                                 timesteps)
    if backend == "ref":
        return timestep_embedding_ref(timesteps, dim, flip_sin_to_cos=flip_sin_to_cos, scale=scale,
                                      downscale_freq_shift=downscale_freq_shift, max_period=max_period)
    refuse_grad("timestep_embedding", backend, timesteps)
    return _embed(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend)


def _embedding_fake(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float,
                    max_period: float, *, backend: str) -> Tensor:
    _check_embedding(timesteps, dim, backend)
    return timesteps.new_empty((timesteps.shape[0], dim), dtype=torch.float32)


def _mlp_kernel(timesteps: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float, max_period: float, *,
                backend: str) -> Tensor:
    _check_mlp(timesteps, w1, b1, w2, b2, backend)
    if backend == "auto":
        backend = choose_backend(w1.device, w1.dtype, MLP_DTYPES, ("triton", "cuda", "cpu"), timesteps, w1, b1, w2, b2)
    options = {"flip_sin_to_cos": flip_sin_to_cos, "downscale_freq_shift": downscale_freq_shift, "scale": scale,
               "max_period": max_period}
    if backend == "ref":
        return timestep_mlp_ref(timesteps, w1, b1, w2, b2, **options)
    refuse_grad("timestep_mlp", backend, timesteps, w1, b1, w2, b2)
    if backend != "triton":  # the compiled embedding, then the spec's own matmuls
        emb = _embed(timesteps, w1.shape[1], flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend)
        return F.linear(F.silu(F.linear(emb.to(w1.dtype), w1, b1)), w2, b2)
    from .triton import timestep_embedding as triton_kernels  # lazy: triton is optional

    hidden = torch.empty((timesteps.shape[0], w1.shape[0]), dtype=w1.dtype, device=w1.device)
    if hidden.numel() > 0:
        freqs = frequency_table(w1.shape[1] // 2, downscale_freq_shift, max_period, timesteps.device)
        with device_guard(hidden.device):
            triton_kernels.embedding_linear_silu(hidden, _readable(timesteps), freqs, w1, b1, flip_sin_to_cos, scale)
    return F.linear(hidden, w2, b2)


def _check_mlp(timesteps: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, backend: str) -> None:
    _check_timesteps("timestep_mlp", timesteps, backend)
    if w1.dim() != 2 or w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"timestep_mlp: need w1 [H, dim] and w2 [O, H], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    for name, bias, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"timestep_mlp: {name} must have shape ({size},), got {tuple(bias.shape)}")
    for name, t in (("w2", w2), ("b1", b1), ("b2", b2)):
        if t is not None and (t.dtype != w1.dtype or t.device != w1.device):
            raise ValueError(f"timestep_mlp: {name} is {t.dtype} on {t.device}; the weights must share w1's dtype "
                             f"and device ({w1.dtype} on {w1.device})")
    if timesteps.device != w1.device:
        raise ValueError(f"timestep_mlp: timesteps are on {timesteps.device} but the weights on {w1.device}")
    if not w1.is_floating_point():
        raise ValueError(f"timestep_mlp: the weights must be floating point, got {w1.dtype}")
    check_kernel_support("timestep_mlp", backend, w1.device, w1.dtype, MLP_DTYPES)


def _mlp_fake(timesteps: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
              flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float, max_period: float, *,
              backend: str) -> Tensor:
    _check_mlp(timesteps, w1, b1, w2, b2, backend)
    return w1.new_empty((timesteps.shape[0], w2.shape[0]))


_embedding_op = define(
    "timestep_embedding(Tensor timesteps, int dim, bool flip_sin_to_cos, float downscale_freq_shift, float scale, "
    "float max_period, *, str backend) -> Tensor",
    _embedding_kernel,
    _embedding_fake,
)
_mlp_op = define(
    "timestep_mlp(Tensor timesteps, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool flip_sin_to_cos, "
    "float downscale_freq_shift, float scale, float max_period, *, str backend) -> Tensor",
    _mlp_kernel,
    _mlp_fake,
)


def timestep_embedding_module_cpu(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor | None:
    """A model's own timestep embedding by the "cpu" kernel, called directly: timestep_embedding(...,
    backend="cpu")'s result, or None where the op must run the call (as group_norm_module_cpu: the op's dispatch
    and checks cost more than the kernel). timesteps [B] of a dtype the kernel reads; None under tracing or
    torch.compile, a dispatch mode or a tensor subclass, for other shapes or dtypes, gradients, dim < 0, or without
    blitzdiff._C."""
    if (not eager_cpu(timesteps) or timesteps.dim() != 1 or timesteps.dtype not in _TIMESTEP_DTYPES or dim < 0
            or (timesteps.requires_grad and torch.is_grad_enabled()) or cpu_kernel("timestep_embedding_cpu") is None):
        return None
    with profiled("timestep_embedding"):
        return _embed(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, "cpu")


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
    """timestep_embedding_ref's result by `backend` ("auto", "ref", "cpu", "cuda" or "triton"):
    `blitzdiff::timestep_embedding`. timesteps: [B], any real dtype and stride. Returns float32 [B, dim].

    "triton" runs on CUDA tensors, or CPU ones under TRITON_INTERPRET=1; "auto" picks the fastest backend built for
    the device, "ref" where none is (or gradients are needed). "ref" runs the spec's PyTorch ops themselves, not the
    op, so export, autograd and torch.compile's fusion see ordinary ops.
    """
    if backend == "ref":
        _check_embedding(timesteps, dim, backend)
        return timestep_embedding_ref(timesteps, dim, flip_sin_to_cos=flip_sin_to_cos,
                                      downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
    return _embedding_op(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, backend=backend)


def timestep_mlp(
    timesteps: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    backend: str = "ref",
) -> Tensor:
    """timestep_mlp_ref's result by `backend` (as timestep_embedding): `blitzdiff::timestep_mlp`.

    w1 / b1 / w2 / b2: linear_1's and linear_2's weights and biases (e.g. a TimestepEmbedding module's), one dtype
    and device; "triton" takes float16 / bfloat16 / float32 weights, the others any floating dtype. "auto" prefers
    the fused Triton kernel on a GPU (one launch where the others take two before linear_2). Returns [B, O]. "ref"
    runs the spec's PyTorch ops themselves, not the op (as timestep_embedding).
    """
    if backend == "ref":
        _check_mlp(timesteps, w1, b1, w2, b2, backend)
        return timestep_mlp_ref(timesteps, w1, b1, w2, b2, flip_sin_to_cos=flip_sin_to_cos,
                                downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period)
    return _mlp_op(timesteps, w1, b1, w2, b2, flip_sin_to_cos, downscale_freq_shift, scale, max_period,
                   backend=backend)
