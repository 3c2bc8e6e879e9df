"""Per-sample, counter-based Gaussian noise (ARCHITECTURE.md contracts 4 and 5).

Noise for sample i is a pure function of (seed_i, stream, element index): a 32-bit integer hash of a counter, then
Box-Muller. So sample i gets the same noise whatever the batch size, batch composition or number of devices; there
is no generator state to advance, capture or restore; and seeds are a device tensor, so a captured CUDA graph or a
compiled loop takes new seeds by a copy into a static buffer.

`gaussian_noise_ref` is the specification, in ordinary tensor ops (runs anywhere, what export traces). The "cpu"
and "cuda" backends run csrc/gaussian_noise_* through `blitzdiff._C` in one pass: the same integer hash in native
wrapping uint32 arithmetic (bit-identical), the same float32 uniforms and Box-Muller, with log / cos evaluated in
double precision by vectorized polynomials (CPU; on torch's thread count, the same bits for any count) or CUDA's
math library, within a few ulp of PyTorch's float32 functions. One `torch.library` op,
`blitzdiff::gaussian_noise`, covers all backends; the backend is an explicit argument, never chosen at import.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._backends import DTYPE_NAMES, check_kernel_support, choose_backend
from ._backends import check_backend as _check_backend_name
from ._library import define, launch

BACKENDS = ("ref", "cpu", "cuda")
# dtypes the compiled kernels write; "ref" returns any floating dtype (computed in float32, rounded once).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
MAX_STREAM = 1 << 31  # streams are in [0, 2**31)
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32); every intermediate stays below 2**49.

    torch has no wrapping uint32 multiply on every backend, so the multiply is done in 16-bit halves of `constant`.
    """
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """'lowbias32' (C. Wellons, hash-prospector): a bijective 32-bit avalanche hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def noise_bits_ref(seeds: Tensor, stream: int, counter: Tensor) -> Tensor:
    """The hash: int64 [B, N] of 32-bit values, row i keyed by (seeds[i], stream), column j hashing counter[j].

    seeds: int64 [B]; counter: int64 [N], non-negative (below 2**47, past which the int64 emulation overflows).
    """
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key1 = _mix32(seed_lo ^ _mix32(torch.full_like(seeds, stream)))  # [B]
    key2 = _mix32(seed_hi ^ _mix32((key1 + 0x9E3779B9) & _MASK32))  # [B]
    return _mix32(_mix32(counter[None, :] ^ key1[:, None]) ^ key2[:, None])  # [B, N]


def gaussian_noise_ref(seeds: Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Unit Gaussian noise [B, *shape] of `dtype`; row i depends only on (seeds[i], stream). The specification.

    seeds: int64 [B] (non-negative, < 2**63); stream: a host int naming the draw (e.g. the stage), in [0, 2**31).
    """
    count = math.prod(shape)
    counter = torch.arange(2 * count, dtype=torch.int64, device=seeds.device)  # [2N]: two uniforms per normal
    bits = noise_bits_ref(seeds, stream, counter)  # [B, 2N]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24-bit uniforms in (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, :count]))
    normal = radius * torch.cos((2.0 * math.pi) * uniform[:, count:])  # Box-Muller, cosine branch
    return normal.reshape(seeds.shape[0], *shape).to(dtype)


def _check_inputs(seeds: Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype, backend: str) -> None:
    """Raise ValueError naming what is wrong and what is allowed; shared by the real and the fake kernel."""
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(
            f"gaussian_noise: seeds must be a 1-D int64 tensor (one seed per sample), got {seeds.dtype} of shape "
            f"{tuple(seeds.shape)}; blitzdiff.engine.noise.seed_tensor builds one"
        )
    if not 0 <= stream < MAX_STREAM:
        raise ValueError(f"gaussian_noise: stream must be in [0, 2**31), got {stream}")
    if any(size < 0 for size in shape):
        raise ValueError(f"gaussian_noise: shape must have non-negative sizes, got {tuple(shape)}")
    check_backend(backend, seeds.device, dtype)


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless `backend` can write noise of `dtype` from seeds on `device`."""
    _check_backend_name("gaussian_noise", backend, BACKENDS)
    if not dtype.is_floating_point:
        raise ValueError(f"gaussian_noise: dtype must be a floating dtype, got {dtype}")
    check_kernel_support("gaussian_noise", backend, device, dtype, KERNEL_DTYPES, inputs="seeds")


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest eager backend for noise of `dtype` on `device`: the compiled kernel where blitzdiff._C has one
    for that device and dtype, else "ref". Chosen per call from what is installed, never at import."""
    return choose_backend(device, dtype, KERNEL_DTYPES, ("cuda", "cpu"))


def _gaussian_noise_kernel(
    seeds: Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype, *, backend: str
) -> Tensor:
    _check_inputs(seeds, stream, shape, dtype, backend)
    if backend == "ref":
        return gaussian_noise_ref(seeds, stream, shape, dtype).contiguous()
    seeds = seeds.contiguous()
    out = torch.empty((seeds.shape[0], *shape), dtype=dtype, device=seeds.device)
    args = (out.data_ptr(), seeds.data_ptr(), seeds.shape[0], math.prod(shape), stream, DTYPE_NAMES[dtype])
    launch("gaussian_noise", backend, seeds.device, *args, threaded=True)
    return out


def _gaussian_noise_fake(
    seeds: Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype, *, backend: str
) -> Tensor:
    _check_inputs(seeds, stream, shape, dtype, backend)
    return seeds.new_empty((seeds.shape[0], *shape), dtype=dtype)


_gaussian_noise_op = define(
    "gaussian_noise(Tensor seeds, int stream, SymInt[] shape, ScalarType dtype, *, str backend) -> Tensor",
    _gaussian_noise_kernel,
    _gaussian_noise_fake,
)


def gaussian_noise(seeds: Tensor, stream: int, shape: Sequence[int], dtype: torch.dtype, *, backend: str) -> Tensor:
    """Unit Gaussian noise [B, *shape] of `dtype` from `backend` ("ref", "cpu" or "cuda"): `blitzdiff::gaussian_noise`.

    seeds: int64 [B] on the backend's device (any device for "ref"); stream: int in [0, 2**31) naming the draw.
    Row i depends only on (seeds[i], stream). dtype: "cpu" writes float32 / float64, "cuda" also float16 /
    bfloat16, "ref" any floating dtype; all compute in float32 and round once. Returns a new contiguous tensor on
    seeds' device.
    """
    return _gaussian_noise_op(seeds, stream, shape, dtype, backend=backend)


def noise_bits(seeds: Tensor, stream: int, first: int, n: int, *, backend: str) -> Tensor:
    """The integer hash behind gaussian_noise, int64 [B, n], for the counters first, ..., first + n - 1.

    A plain function (not an op) that exposes the integer part of each backend exactly, for tests: counters
    0 .. count-1 feed the radius and count .. 2*count-1 the angle of a [B, count] draw.
    """
    _check_inputs(seeds, stream, (n,), torch.float32, backend)
    if first < 0 or first + n > 1 << 47:
        raise ValueError(f"noise_bits: need 0 <= first and first + n <= 2**47, got first={first}, n={n}")
    if backend == "ref":
        return noise_bits_ref(seeds, stream, torch.arange(first, first + n, dtype=torch.int64, device=seeds.device))
    seeds = seeds.contiguous()
    out = torch.empty((seeds.shape[0], n), dtype=torch.int64, device=seeds.device)
    launch("gaussian_noise", backend, seeds.device, out.data_ptr(), seeds.data_ptr(), seeds.shape[0], stream, first, n,
           kernel="noise_bits")
    return out
