"""Scaled dot-product attention for self- and cross-attention in UNets and DiTs.

`attention_ref` is the specification: softmax(q k^T * scale) v by PyTorch's scaled_dot_product_attention (a
standard op: it runs anywhere and exports to ONNX). The op `blitzdiff::attention` computes it with a backend chosen
per call (ARCHITECTURE.md contract 5): "ref" (the spec), "triton" (kernels/triton/attention.py, imported on first
use), "cuda" (csrc/attention_cuda.cu through blitzdiff._C: pointers, strides and a stream, no torch linkage),
"cpu" (csrc/attention_cpu.cpp, float32) or "auto". The GPU kernels are FlashAttention-2 forwards: online softmax in
float32, the [Lq, Lk] score matrix never in memory; the CPU kernel computes 8 query rows at a time (their scores in
L1, then softmax, then p v) with the register-tiled micro-kernel of the direct convolution, 1.1-2.1x faster than
PyTorch's CPU SDPA (its flash kernel) at every shape measured (README "Fused kernels"). All read q / k / v in place
through their strides (the [B, L, H, D] -> [B, H, L, D] transposes models make cost no copy) and store the result as
[B, Lq, H, D], so merging the heads back into [B, Lq, H * D] is a view too; `attention(..., backend="ref")` runs the
spec itself, whose layout is SDPA's (see `attention`).
"""

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ._backends import (
    DTYPE_NAMES,
    check_backend,
    check_device,
    choose_backend,
    cpu_kernel,
    device_guard,
    eager_cpu,
    needs_grad,
    profiled,
    refuse_grad,
)
from ._library import call_cpu, define, launch, native

BACKENDS = ("ref", "triton", "cuda", "cpu", "auto")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the GPU kernels; "ref" takes any floating dtype
CPU_DTYPES = (torch.float32,)  # the CPU kernel
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 16, 128, 8  # the kernels' head dims: 16, 24, ..., 128
_MAX_LEN = 2**30  # the kernels index rows in int32, with a tile of headroom


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """q: [B, H, Lq, D], k and v: [B, H, Lk, D] -> [B, H, Lq, D]. scale defaults to 1 / sqrt(D). No mask."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def kernel_limits(q: Tensor, k: Tensor, backend: str = "cuda") -> str | None:
    """Why `backend`'s kernel cannot take q [B, H, Lq, D] / k [B, H, Lk, D] (dtype, head dim, lengths), or None."""
    head_dim = q.shape[-1]
    if backend == "cpu":
        return None if q.dtype in CPU_DTYPES else f"takes float32, got {q.dtype}"
    if q.dtype not in KERNEL_DTYPES:
        return f"takes float16, bfloat16 or float32, got {q.dtype}"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        return f"takes head dims that are multiples of 8 in [16, 128], got {head_dim}"
    if max(q.shape[2], k.shape[2]) > _MAX_LEN:
        return f"takes sequences of at most 2**30 tokens, got {q.shape[2]} queries and {k.shape[2]} keys"
    return None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, backend: str) -> None:
    """Raise ValueError naming what is wrong and what is allowed; shared by the real and the fake kernel."""
    check_backend("attention", backend, BACKENDS)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D [B, H, L, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: need q [B, H, Lq, D] and k, v [B, H, Lk, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if backend in ("ref", "auto"):
        return
    if (problem := kernel_limits(q, k, backend)) is not None:
        raise ValueError(f"attention: backend {backend!r} {problem}; use backend='ref' (or 'auto', which falls back)")
    check_device("attention", backend, q.device)


def _cuda_operand(t: Tensor) -> tuple[Tensor, list[int]]:
    """(t, its batch / head / row strides) when the CUDA kernel can read t in place (unit head-dim stride, 16-byte
    aligned base and strides), else a dense copy's; a size-1 dimension's stride is never used, so it is sent as 0."""
    vec = 16 // t.element_size()

    def strides(x: Tensor) -> list[int]:
        return [0 if size == 1 else stride for size, stride in zip(x.shape[:3], x.stride()[:3], strict=True)]

    if t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in strides(t)):
        return t, strides(t)
    dense = t.clone(memory_format=torch.contiguous_format)
    return dense, strides(dense)


def _output_strides(q: Tensor) -> tuple[int, ...]:
    """The op's result, [B, H, Lq, D], is stored as a dense [B, Lq, H, D]: the merge of the heads a model does next,
    out.transpose(1, 2).reshape(B, Lq, H * D), is a view (it is also how PyTorch's flash SDPA stores its result)."""
    _, heads, len_q, head_dim = q.shape
    return (len_q * heads * head_dim, head_dim, heads * head_dim, 1)


# Multiply-adds of q k^T from which the op's "auto" runs the C++ kernel: below, the op's own call around it cost more
# than it saved (unet-digits' 1x2x64x64x32, 262144: 25 against SDPA's 23 us through the op; the models call the
# kernel directly, where it took 16 against 22 us).
CPU_MIN_MACS = 2**19


def auto_backend(q: Tensor, k: Tensor, v: Tensor) -> str:
    """What "auto" runs: "cpu" for float32 CPU tensors of at least CPU_MIN_MACS when blitzdiff._C is built and no
    gradient is needed, else "ref": PyTorch's SDPA, which on an H200 (torch 2.11, cuDNN attention) ran 1.0-2.7x
    faster than the CUDA kernel and 1.4-4x faster than the Triton one at every shape of
    benchmarks/kernels/bench_attention.py (results/gpu-NVIDIA-H200-20261204/kernels.md)."""
    if q.numel() * k.shape[2] < CPU_MIN_MACS:
        return "ref"
    return choose_backend(q.device, q.dtype, {"cpu": CPU_DTYPES}, ("cpu",), q, k, v)


def _cpu_operand(t: Tensor) -> Tensor:
    """t when the CPU kernel can read it in place (unit head-dim stride), else a dense copy."""
    return t if t.stride(3) == 1 else t.contiguous()


def _run_cpu(kernel, out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
    """blitzdiff._C.attention_cpu (`kernel`) into the op's result buffer `out` (dense [B, Lq, H, D], viewed as
    [B, H, Lq, D]) from q, k, v with unit head-dim strides, on torch's thread count: for the op and the models'
    direct calls alike."""
    batch, heads, len_q, head_dim = q.shape
    call_cpu(kernel, out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, heads, len_q, k.shape[2],
             head_dim, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], scale, torch.get_num_threads(),
             keep=(out, q, k, v))


def _attention_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, backend: str) -> Tensor:
    _check_inputs(q, k, v, backend)
    if backend == "auto":
        backend = auto_backend(q, k, v)
    if backend == "ref":
        result = attention_ref(q, k, v, scale)
        # SDPA's layout depends on its own backend: keep its result when it is the op's layout already.
        if result.stride() == _output_strides(q) and result.storage_offset() == 0:
            return result
        return q.new_empty_strided(q.shape, _output_strides(q)).copy_(result)
    refuse_grad("attention", backend, q, k, v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = q.new_empty_strided(q.shape, _output_strides(q))
    if out.numel() == 0:
        return out
    if len_k == 0:
        return out.zero_()  # the spec's value: an empty weighted sum (PyTorch's SDPA returns zeros)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if backend == "cpu":
        _run_cpu(native("attention", "cpu").attention_cpu, out, _cpu_operand(q), _cpu_operand(k), _cpu_operand(v),
                 scale)
        return out
    if backend == "triton":
        from .triton.attention import attention_forward

        with device_guard(q.device):
            attention_forward(q, k, v, out, scale)
        return out
    (q, q_strides), (k, k_strides), (v, v_strides) = _cuda_operand(q), _cuda_operand(k), _cuda_operand(v)
    launch("attention", "cuda", q.device, out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, heads,
           len_q, len_k, head_dim, *q_strides, *k_strides, *v_strides, scale, DTYPE_NAMES[q.dtype])
    return out


def _attention_fake(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, backend: str) -> Tensor:
    _check_inputs(q, k, v, backend)
    return q.new_empty_strided(q.shape, _output_strides(q))


_attention_op = define(
    "attention(Tensor q, Tensor k, Tensor v, float? scale=None, *, str backend) -> Tensor",
    _attention_kernel,
    _attention_fake,
)


def attention_module_cpu(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """A model's own attention by the "cpu" kernel, called directly: attention(..., backend="cpu")'s result (default
    scale), or None where the op or the spec must run: not float32, tracing or torch.compile, a dispatch mode or a
    tensor subclass, gradients, no keys, a head dimension with a stride, or without blitzdiff._C. For the modules'
    calls in eager sampling (q, k, v from the module's own projections, shapes already right): the op's dispatch and
    checks would cost about as much as the kernel on a batch-1 UNet's 64 tokens."""
    if (q.dtype not in CPU_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or not eager_cpu(q)
            or needs_grad(q, k, v) or k.shape[2] == 0 or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1):
        return None
    kernel = cpu_kernel("attention_cpu")
    if kernel is None:
        return None
    out = q.new_empty_strided(q.shape, _output_strides(q))  # the op's layout (q's dtype and device, not torch's)
    if out.numel():
        with profiled("attention"):
            _run_cpu(kernel, out, q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, backend: str = "ref") -> Tensor:
    """attention_ref's result computed by `backend` (see BACKENDS): `blitzdiff::attention`.

    q: [B, H, Lq, D], k and v: [B, H, Lk, D], one dtype and device, any strides; scale defaults to 1 / sqrt(D).
    "triton" and "cuda" take float16 / bfloat16 / float32 with D a multiple of 8 in [16, 128] (CUDA tensors; the
    Triton kernel also CPU ones under TRITON_INTERPRET=1), "cpu" float32 CPU tensors of any D; all refuse inputs
    that require grad while grad mode is on. "auto" runs "cpu" for float32 CPU tensors but the smallest and "ref"
    (SDPA) everywhere else (see auto_backend). Returns a new [B, H, Lq, D] tensor; from the op (every
    backend but "ref") it is stored as a dense [B, Lq, H, D], so out.transpose(1, 2).reshape(B, Lq, H * D) merges
    the heads without a copy.

    "ref" runs attention_ref itself, not the op, so export (ONNX), autograd and torch.compile see PyTorch's SDPA, and
    the layout is the one SDPA's kernel chose: for q the transposed view of a [B, Lq, H, D] projection, as models
    pass it, SDPA's CPU and fused CUDA kernels store a dense [B, Lq, H, D] too (the merge is a view); otherwise it
    may be contiguous [B, H, Lq, D] (on the CPU the result follows q's layout), and the merge's reshape copies.
    """
    if backend == "ref":
        _check_inputs(q, k, v, backend)
        return attention_ref(q, k, v, scale)
    return _attention_op(q, k, v, scale, backend=backend)
