"""blitzdiff.kernels.attention: the kernels (Triton, CUDA, C++) against the spec `attention_ref`.

Error budget (flash-attention's rule): against float64 attention of the same (already rounded) inputs, a kernel's
max error is at most 2x that of plain PyTorch in the inputs' dtype (scores, softmax and P V each rounded to it),
plus one float32 ulp of the largest output: negligible for float16 / bfloat16, the resolution of a float32 result
(float32 errors are a few ulps, where a max over few elements is noisy), and what lets exact cases (Lk = 1) pass.
Lengths 1 / 7 / 77 / 97 hit tile tails (Triton tiles are 32 in the interpreter, 32-128 on a GPU; CUDA 32 / 64; the
C++ kernel 8 query rows, 16 keys, 64 query rows per work item, also 130 here).
Here (no GPU) the Triton kernel runs in Triton's CPU interpreter at tiny shapes, and of the CUDA kernel only its
host-side argument checks and operand handling run; on a GPU (`cuda` marker) both kernels run compiled at the
issue's shapes: SD1.5 64x64 latents (4096 tokens, head dims 40 / 80, 77 text tokens), DiT-XL/2 (256 / 1024
tokens, 16 heads of 72), Lq / Lk of 1025, every head dim 16 .. 128, graph capture and side streams.
"""

import importlib
import math
import subprocess
import sys

import pytest
import torch

from blitzdiff.kernels import attention, attention_ref
from blitzdiff.kernels._backends import triton_interpreted
from blitzdiff.kernels.attention import _cuda_operand, attention_module_cpu

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATTENTION = torch.ops.blitzdiff.attention.default


def make_qkv(batch, heads, len_q, len_k, head_dim, dtype, device="cpu", seed=0, layout="bhld"):
    """q [B, H, Lq, D], k, v [B, H, Lk, D] of unit normals. layout "blhd": transposed views of [B, L, H, D] tensors,
    as models make them; "fused_kv": k and v also interleaved in one [B, Lk, 2, H, D] projection."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    if layout == "bhld":
        return randn(batch, heads, len_q, head_dim), randn(batch, heads, len_k, head_dim), randn(
            batch, heads, len_k, head_dim)
    q = randn(batch, len_q, heads, head_dim).transpose(1, 2)
    if layout == "blhd":
        return q, randn(batch, len_k, heads, head_dim).transpose(1, 2), randn(batch, len_k, heads, head_dim).transpose(
            1, 2)
    assert layout == "fused_kv"
    k, v = randn(batch, len_k, 2, heads, head_dim).transpose(1, 3).unbind(2)  # [B, H, Lk, D] each
    return q, k, v


def plain_attention(q, k, v, scale=None):
    """Unfused PyTorch in q's dtype: the scores, the softmax and P V each rounded to it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def errors(out, q, k, v, scale=None):
    """(max |out - exact|, max |plain - exact|, max |exact|), exact = float64 attention of the same inputs."""
    exact = attention_ref(q.double(), k.double(), v.double(), scale)
    plain = plain_attention(q, k, v, scale)
    return (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item(), \
        exact.abs().max().item()


def assert_within_budget(out, q, k, v, scale=None, factor=2):
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.transpose(1, 2).is_contiguous()  # the op's layout: a dense [B, Lq, H, D]
    err, plain_err, largest = errors(out, q, k, v, scale)
    assert err <= factor * plain_err + torch.finfo(torch.float32).eps * largest, (err, plain_err)


# --- Triton, in the interpreter here (tiny shapes) ---

LENGTHS = [1, 7, 77, 97]  # every (Lq, Lk) pair: self- and cross-attention, one tile and several, each with a tail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("len_k", LENGTHS)
@pytest.mark.parametrize("len_q", LENGTHS)
def test_triton_tails_within_budget(len_q, len_k, dtype):
    q, k, v = make_qkv(1, 2, len_q, len_k, 40, dtype, TRITON_DEVICE, seed=len_q * 100 + len_k)
    assert_within_budget(attention(q, k, v, backend="triton"), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 40, 64, 80, 128])  # 40 / 80: SD1.5; 32 / 64 / 128: powers of two
def test_triton_head_dims_within_budget(head_dim, dtype):
    q, k, v = make_qkv(1, 2, 33, 77, head_dim, dtype, TRITON_DEVICE, seed=head_dim)
    assert_within_budget(attention(q, k, v, backend="triton"), q, k, v)


@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0, 40.0, -40.0])
def test_triton_explicit_scale(scale):
    # A negative scale makes the smallest score the largest; 0 gives every key the same weight (the mean of v).
    q, k, v = make_qkv(2, 1, 7, 40, 64, torch.float32, TRITON_DEVICE)
    out = attention(q, k, v, scale, backend="triton")
    assert_within_budget(out, q, k, v, scale)
    if scale == 0.0:
        torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))


@pytest.mark.parametrize("layout", ["blhd", "fused_kv"])
def test_triton_reads_strided_views_in_place(layout):
    q, k, v = make_qkv(2, 3, 19, 45, 32, torch.float16, TRITON_DEVICE, layout=layout)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = attention(q, k, v, backend="triton")
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    assert_within_budget(out, q, k, v)


def test_triton_bitwise_repeatable():
    q, k, v = make_qkv(1, 2, 40, 70, 64, torch.bfloat16, TRITON_DEVICE)
    first = attention(q, k, v, backend="triton")
    for _ in range(3):
        assert torch.equal(attention(q, k, v, backend="triton"), first)


# --- the C++ kernel (float32, any head dim), both of its loops ---
# Its budget is 4x plain PyTorch's error (CPU_FACTOR): it sums each score q . k in one chain over the head dimension
# where PyTorch's GEMM sums in blocks, which shows when a large scale amplifies the scores' rounding (scale 40:
# 2.0x); at the models' 1 / sqrt(D) it measured 0.7-1.3x.

CPU_FACTOR = 4
CPU_LENGTHS = [1, 7, 77, 130]  # 130: past a 64-row work item, with a tail of 2 rows


def native_attention(q, k, v, scale=None, *, threads=1, generic=False):
    """blitzdiff._C.attention_cpu called directly (so the portable loop runs too): [B, H, Lq, D] as the op's view."""
    native = importlib.import_module("blitzdiff._C")
    batch, heads, len_q, head_dim = q.shape
    out = torch.full((batch, len_q, heads, head_dim), float("nan"))
    native.attention_cpu(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, heads, len_q, k.shape[2],
                         head_dim, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                         1.0 / math.sqrt(head_dim) if scale is None else scale, threads, generic)
    return out.transpose(1, 2)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("len_k", CPU_LENGTHS)
@pytest.mark.parametrize("len_q", CPU_LENGTHS)
def test_cpu_tails_within_budget(len_q, len_k, generic):
    q, k, v = make_qkv(1, 2, len_q, len_k, 40, torch.float32, seed=len_q * 100 + len_k, layout="blhd")
    out = native_attention(q, k, v, generic=generic)
    assert_within_budget(out, q, k, v, factor=CPU_FACTOR)
    if not generic:
        assert torch.equal(out, attention(q, k, v, backend="cpu"))  # the op calls the same loop


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("head_dim", [1, 8, 20, 24, 32, 72, 128, 160])  # 24: dit-digits; 72: DiT-XL/2
def test_cpu_head_dims_within_budget(head_dim, generic):
    q, k, v = make_qkv(2, 3, 33, 70, head_dim, torch.float32, seed=head_dim, layout="fused_kv")
    assert_within_budget(native_attention(q, k, v, generic=generic), q, k, v, factor=CPU_FACTOR)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0, 40.0, -40.0])
def test_cpu_explicit_scale(scale, generic):
    # A negative scale makes the smallest score the largest; 0 gives every key the same weight (the mean of v); +-40
    # makes the scores span hundreds, where a softmax without its max subtracted overflows (with a negative scale,
    # subtracting the largest score instead of the smallest did).
    q, k, v = make_qkv(2, 1, 7, 40, 64, torch.float32)
    out = native_attention(q, k, v, scale, generic=generic)
    assert out.isfinite().all()
    assert_within_budget(out, q, k, v, scale, factor=CPU_FACTOR)
    if scale == 0.0:
        torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))
    if not generic:
        assert torch.equal(attention(q, k, v, scale, backend="cpu"), out)


@pytest.mark.parametrize("layout", ["blhd", "fused_kv"])
def test_cpu_reads_strided_views_in_place(layout):
    q, k, v = make_qkv(2, 3, 19, 45, 32, torch.float32, layout=layout)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = attention(q, k, v, backend="cpu")
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="cpu"))
    assert_within_budget(out, q, k, v, factor=CPU_FACTOR)
    gaps = q.new_empty(2, 3, 19, 64)[..., ::2].copy_(q)  # a head dimension with a stride: read as a dense copy
    assert torch.equal(attention(gaps, k, v, backend="cpu"), out)


@pytest.mark.parametrize("generic", [False, True])
def test_cpu_same_bits_for_any_thread_count_and_batch_composition(generic):
    q, k, v = make_qkv(3, 2, 130, 77, 24, torch.float32, layout="blhd")
    one = native_attention(q, k, v, generic=generic)
    for threads in (2, 3, 8):
        assert torch.equal(native_attention(q, k, v, threads=threads, generic=generic), one)
    for b in range(3):
        assert torch.equal(native_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], generic=generic), one[b:b + 1])


def test_cpu_loops_agree_to_rounding():
    q, k, v = make_qkv(2, 2, 64, 64, 32, torch.float32)
    torch.testing.assert_close(native_attention(q, k, v), native_attention(q, k, v, generic=True),
                               rtol=1e-5, atol=1e-6)


def test_module_call_is_the_ops_cpu_result_or_declines():
    q, k, v = make_qkv(2, 2, 17, 64, 24, torch.float32, layout="fused_kv")
    with torch.no_grad():
        out = attention_module_cpu(q, k, v)
    assert torch.equal(out, attention(q, k, v, backend="cpu"))
    assert out.transpose(1, 2).is_contiguous()
    assert attention_module_cpu(q.double(), k.double(), v.double()) is None  # float32 only
    assert attention_module_cpu(q.requires_grad_(), k, v) is None  # gradients: the spec's ops must run
    q = q.detach()
    assert attention_module_cpu(q, k[:, :, :0], v[:, :, :0]) is None  # no keys: the op's zeros
    assert attention_module_cpu(q.to("meta"), k.to("meta"), v.to("meta")) is None


def test_module_call_ignores_torchs_default_dtype_and_device():
    q, k, v = make_qkv(1, 2, 9, 9, 16, torch.float32, layout="blhd")
    expected = attention_module_cpu(q, k, v)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            out = attention_module_cpu(q, k, v)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and torch.equal(out, expected)


CPU_NATIVE_BAD = {  # change to the arguments of a valid call: what the message must mention
    "threads": ({"threads": 0}, "threads must be >= 1, got 0"),
    "head_dim": ({"head_dim": 0}, "head_dim >= 1"),
    "negative": ({"len_q": -1}, "need batch, heads, len_q, len_k >= 0"),
    "empty_keys": ({"len_k": 0}, "len_k must be >= 1"),
    "null": ({"v": 0}, "must be non-null pointers"),
}


def test_cpu_native_entry_checks_its_arguments():
    native = importlib.import_module("blitzdiff._C")
    q = torch.randn(1, 1, 2, 16)
    out = torch.full((1, 2, 1, 16), 7.0)
    args = {"out": out.data_ptr(), "q": q.data_ptr(), "k": q.data_ptr(), "v": q.data_ptr(), "batch": 1, "heads": 1,
            "len_q": 2, "len_k": 2, "head_dim": 16, **{f"{t}_stride_{d}": s for t in "qkv" for d, s in
                                                         zip("bhl", (32, 32, 16), strict=True)},
            "scale": 0.25, "threads": 1}
    for change, message in CPU_NATIVE_BAD.values():
        with pytest.raises(ValueError, match=message):
            native.attention_cpu(**{**args, **change})
    assert torch.equal(out, torch.full((1, 2, 1, 16), 7.0))  # nothing written
    assert native.attention_cpu(**{**args, "batch": 0, "len_k": 0, "out": 0}) is None  # empty: returns


# --- the op: sizes, dispatch, checks ---


@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 16), (1, 2, 0, 7, 16), (1, 2, 5, 0, 16)])
@pytest.mark.parametrize("backend", ["ref", "triton", "cpu"])
def test_empty_sizes_match_the_spec(backend, shape):
    # Lk = 0 is an empty weighted sum: zeros, as PyTorch's SDPA returns.
    q, k, v = make_qkv(*shape, torch.float32, TRITON_DEVICE if backend == "triton" else "cpu")
    out = attention(q, k, v, backend=backend)
    assert out.shape == q.shape
    assert torch.equal(out, attention_ref(q, k, v))


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("backend", ["ref", "auto", "triton", "cpu"])
def test_heads_merge_without_a_copy(backend, layout):
    # The op ("auto", which runs the spec here, and the kernels) returns a dense [B, Lq, H, D] whatever q's layout:
    # a model's [B, H, L, D] -> [B, L, H * D] merge is a view. "ref" is SDPA itself, whose CPU kernel stores that
    # layout for the models' q (a transposed [B, L, H, D] view); for a contiguous q its layout is SDPA's business.
    q, k, v = make_qkv(2, 3, 17, 9, 16, torch.float32, TRITON_DEVICE if backend == "triton" else "cpu", layout=layout)
    out = attention(q, k, v, backend=backend)
    merged = out.transpose(1, 2).reshape(2, 17, 3 * 16)
    if backend != "ref" or layout == "blhd":
        assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    err, plain_err, largest = errors(out, q, k, v)  # against float64 attention, not the float32 spec (auto's own)
    assert err <= 2 * plain_err + torch.finfo(torch.float32).eps * largest, (err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_auto_runs_the_spec_on_the_cpu_for_other_dtypes(dtype):
    # The C++ kernel takes float32 only; "auto" runs PyTorch's SDPA (bitwise the spec) and never the interpreter.
    q, k, v = make_qkv(2, 3, 9, 13, 160, dtype)  # also a head dim the GPU kernels do not take
    assert torch.equal(attention(q, k, v, backend="auto"), attention_ref(q, k, v).contiguous())


def test_auto_runs_the_cpu_kernel_for_float32_past_its_threshold():
    q, k, v = make_qkv(2, 3, 40, 41, 160, torch.float32)  # 787200 multiply-adds
    out = attention(q, k, v, backend="auto")
    assert torch.equal(out, attention(q, k, v, backend="cpu"))
    assert_within_budget(out, q, k, v, factor=CPU_FACTOR)
    q, k, v = make_qkv(2, 3, 9, 13, 160, torch.float32)  # 112320: the op's own call would cost more
    assert torch.equal(attention(q, k, v, backend="auto"), attention_ref(q, k, v).contiguous())


OPCHECK_CASES = {
    "self": lambda device: (*make_qkv(1, 2, 7, 7, 32, torch.float32, device), None),
    "cross_scaled": lambda device: (*make_qkv(2, 1, 5, 33, 16, torch.float16, device), 0.25),
    "strided": lambda device: (*make_qkv(1, 2, 9, 3, 24, torch.bfloat16, device, layout="fused_kv"), None),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("backend", ["ref", "auto", "triton", "cpu"])
def test_opcheck(backend, case):
    args = OPCHECK_CASES[case](TRITON_DEVICE if backend == "triton" else "cpu")
    if backend == "cpu" and args[0].dtype != torch.float32:
        args = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(ATTENTION, args, {"backend": backend})


def test_compiles_fullgraph_between_other_ops():
    def block(x, w):
        q, k, v = (x @ w).view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)  # [B, L, 3 * H * D] -> 3 x [B, H, L, D]
        return attention(q, k, v, backend="auto").transpose(1, 2).reshape(2, 9, 32).tanh()

    x, w = torch.randn(2, 9, 32), torch.randn(32, 96)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, w), block(x, w))


def test_ref_differentiates_and_kernels_refuse_grad():
    # The op's Autograd key falls through (blitzdiff/kernels/_library.py): the spec's own ops carry gradients, a
    # compiled kernel says it cannot instead of dropping them, and "auto" picks the spec.
    q, k, v = make_qkv(1, 2, 5, 6, 16, torch.float32, TRITON_DEVICE)
    q.requires_grad_(True)
    attention(q, k, v, backend="ref").sum().backward()
    expected = torch.autograd.grad(attention_ref(q, k, v).sum(), q)[0]
    torch.testing.assert_close(q.grad, expected)
    q.grad = None
    attention(q, k, v, backend="auto").sum().backward()  # the spec, so it differentiates too
    torch.testing.assert_close(q.grad, expected)
    with pytest.raises(ValueError, match="not differentiable"):
        attention(q, k, v, backend="triton")
    with torch.no_grad():
        attention(q, k, v, backend="triton")


def _qkv(**changes):
    q, k, v = make_qkv(1, 2, 5, 6, 16, torch.float32)
    parts = {"q": q, "k": k, "v": v}
    parts.update({name: change(parts[name]) for name, change in changes.items()})
    return parts["q"], parts["k"], parts["v"]


BAD_INPUTS = {
    # name: (inputs, backend, what the message must mention)
    "three_d": (_qkv(q=lambda t: t[0]), "ref", "must be 4-D"),
    "head_dim_mismatch": (_qkv(k=lambda t: t[..., :8], v=lambda t: t[..., :8]), "ref", r"need q \[B, H, Lq, D\]"),
    "kv_length_mismatch": (_qkv(v=lambda t: t[:, :, :3]), "ref", "need q"),
    "heads_mismatch": (_qkv(k=lambda t: t[:, :1], v=lambda t: t[:, :1]), "ref", "need q"),
    "dtype_mismatch": (_qkv(v=torch.Tensor.double), "ref", "one floating dtype"),
    "integer": (_qkv(q=torch.Tensor.long, k=torch.Tensor.long, v=torch.Tensor.long), "ref", "floating dtype"),
    "device_mismatch": (_qkv(k=lambda t: t.to("meta")), "ref", "one device"),
    "backend": (_qkv(), "cudnn", "no backend 'cudnn'; allowed: ref, triton, cuda, cpu, auto"),
    "float64_cpu": (_qkv(q=torch.Tensor.double, k=torch.Tensor.double, v=torch.Tensor.double), "cpu",
                    "backend 'cpu' takes float32, got torch.float64"),
    "float64_kernel": (_qkv(q=torch.Tensor.double, k=torch.Tensor.double, v=torch.Tensor.double), "triton",
                       "takes float16, bfloat16 or float32"),
    "head_dim_160": (make_qkv(1, 1, 3, 3, 160, torch.float16), "triton", "multiples of 8 in"),
    "head_dim_not_multiple_of_8": (make_qkv(1, 1, 3, 3, 20, torch.float16), "cuda", "multiples of 8 in"),
    "cuda_on_cpu": (_qkv(), "cuda", "needs tensors on cuda"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    (q, k, v), backend, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, backend=backend)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(*_qkv(), backend="triton")


def test_imports_and_runs_without_triton():
    # triton is optional: importing blitzdiff and running "ref" / "auto" must not touch it.
    code = ("import sys; sys.modules['triton'] = None; import torch; from blitzdiff.kernels import attention; "
            "q = torch.randn(1, 2, 3, 16); torch.testing.assert_close(attention(q, q, q, backend='auto'), "
            "attention(q, q, q)); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_cuda_operands_are_read_in_place_when_aligned():
    # The CUDA kernel reads 16-byte chunks: strided views with aligned strides go in place, others as a dense copy;
    # a size-1 dimension's stride is never used and goes as 0.
    q = torch.randn(2, 5, 1, 24, dtype=torch.float16).transpose(1, 2)  # [2, 1, 5, 24], strides (120, 24, 24, 1)
    same, strides = _cuda_operand(q)
    assert same is q and strides == [120, 0, 24]
    odd = torch.randn(2, 5, 3, 16, dtype=torch.float32)[..., :12].transpose(1, 2)  # row stride 48: fine in float32
    assert _cuda_operand(odd)[0] is odd
    shifted = torch.randn(1 + 2 * 16, dtype=torch.float32)[1:].view(1, 1, 2, 16)  # 4 bytes past the allocation
    copy, strides = _cuda_operand(shifted)
    assert copy is not shifted and copy.data_ptr() % 16 == 0 and torch.equal(copy, shifted) and strides == [0, 0, 16]
    gaps = torch.randn(1, 1, 3, 20, dtype=torch.float16)[..., :16]  # row stride 20: not a multiple of 8 halves
    assert _cuda_operand(gaps)[0].is_contiguous()


NATIVE_ARGS = {"out": 256, "q": 256, "k": 256, "v": 256, "batch": 1, "heads": 1, "len_q": 1, "len_k": 1, "head_dim": 16,
               **{f"{t}_stride_{d}": 16 for t in "qkv" for d in "bhl"}, "scale": 0.25, "dtype": "float16", "stream": 0}
NATIVE_BAD = {  # change to NATIVE_ARGS: what the message must mention (checked before any CUDA call)
    "dtype": ({"dtype": "float64"}, "dtype must be float16, bfloat16 or float32"),
    "head_dim": ({"head_dim": 20}, "head_dim must be a multiple of 8"),
    "misaligned": ({"k": 264}, "16-byte aligned"),
    "stride": ({"v_stride_l": 4}, "multiples of 16 bytes"),
    "empty_keys": ({"len_k": 0}, "len_k must be >= 1"),
    "heads": ({"heads": 70000}, "at most 65535 heads"),
    "length": ({"len_q": 2**30 + 1}, r"at most 2\*\*30"),
}


def test_native_entry_checks_its_arguments():
    # blitzdiff._C.attention_cuda validates on the host, so this runs wherever the CUDA part is built, GPU or not;
    # a build without nvcc has no such function (and the op says how to build it).
    native = importlib.import_module("blitzdiff._C")
    if not native.has_cuda:
        assert not hasattr(native, "attention_cuda")
        return
    for change, message in NATIVE_BAD.values():
        with pytest.raises(ValueError, match=message):
            native.attention_cuda(**{**NATIVE_ARGS, **change})
    assert native.attention_cuda(**{**NATIVE_ARGS, "batch": 0, "len_k": 0}) is None  # empty: returns, no launch


# --- CUDA and compiled Triton (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

GPU_BACKENDS = ["cuda", "triton"]
# (B, H, Lq, Lk, D): SD1.5 64x64 latents (self, and cross to 77 text tokens), DiT-XL/2 at 256 / 1024 tokens,
# odd lengths past a tile, a single token.
GPU_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 16, 256, 256, 72),
              (2, 16, 1024, 1024, 72), (1, 3, 97, 1025, 128), (3, 2, 1025, 97, 64), (1, 2, 1, 1, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_within_budget(backend, shape, dtype):
    q, k, v = make_qkv(*shape[:2], *shape[2:], dtype, "cuda", layout="blhd")
    assert_within_budget(attention(q, k, v, backend=backend), q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", range(16, 129, 8))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_every_head_dim_within_budget(backend, head_dim, dtype):
    q, k, v = make_qkv(2, 3, 131, 77, head_dim, dtype, "cuda", seed=head_dim)
    assert_within_budget(attention(q, k, v, backend=backend), q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["blhd", "fused_kv", "misaligned"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strided_and_misaligned_views(backend, layout):
    if layout == "misaligned":  # a view 8 bytes past a 16-byte boundary: the CUDA kernel reads a dense copy
        q, k, v = (torch.randn(3 * 64 * 40 + 4, device="cuda", dtype=torch.float16)[4:].view(1, 3, 64, 40)
                   for _ in range(3))
    else:
        q, k, v = make_qkv(2, 4, 300, 77, 64, torch.float16, "cuda", layout=layout)
    out = attention(q, k, v, backend=backend)
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend))
    assert_within_budget(out, q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bitwise_repeatable(backend, dtype):
    q, k, v = make_qkv(2, 8, 1025, 1025, 64, dtype, "cuda")
    first = attention(q, k, v, backend=backend)
    for _ in range(20):
        assert torch.equal(attention(q, k, v, backend=backend), first)


@pytest.mark.cuda
def test_gpu_auto_runs_sdpa():
    # Measured on an H200: PyTorch's SDPA (cuDNN) led both kernels at every benchmarked shape, so "auto" runs it.
    q, k, v = make_qkv(2, 4, 333, 200, 80, torch.bfloat16, "cuda")
    assert torch.equal(attention(q, k, v, backend="auto"), attention(q, k, v, backend="ref"))


@pytest.mark.cuda
def test_gpu_batches_past_the_grid_limit():
    # gridDim.z holds at most 65535 (batch) slices; the CUDA launcher splits larger batches.
    q, k, v = make_qkv(65537, 1, 3, 5, 16, torch.float16, "cuda")
    assert_within_budget(attention(q, k, v, backend="cuda"), q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_side_stream_and_graph_capture(backend):
    q, k, v = make_qkv(2, 8, 256, 256, 64, torch.float16, "cuda")
    expected = attention(q, k, v, backend=backend)  # also compiles the Triton kernel before the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches on torch's current stream, not the default one
        out = attention(q, k, v, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q, k, v, backend=backend)
    v.mul_(2.0)  # replay reads the inputs' memory as it is now
    graph.replay()
    torch.testing.assert_close(captured, 2.0 * expected)


@pytest.mark.cuda
@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
def test_gpu_opcheck(backend, case):
    torch.library.opcheck(ATTENTION, OPCHECK_CASES[case]("cuda"), {"backend": backend})
