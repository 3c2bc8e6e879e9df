"""blitzdiff.kernels.group_norm: the cpu / cuda / triton backends against the PyTorch spec `group_norm_ref`.

Error budget (flash-attention style): against the spec computed in float64 on the same (already rounded) inputs, a
kernel's max error is at most 2x that of the spec run at the input precision (`backend="ref"`, which keeps float32
statistics for float16 / bfloat16), plus one ulp of the largest output (as tests/kernels/test_solver_update.py:
on a few hundred values both maxima are an ulp or so, and their ratio is noise); CUDA's float64 matches the
float64 spec to 1e-12. Shapes are odd on purpose: groups of 59 channels, spatial sizes that hit the CPU
kernel's 64-wide columns and 4096-value chunks, the Triton tiles and the CUDA blocks with tails.

Triton runs on the GPU where there is one, else under its interpreter (TRITON_INTERPRET=1) on tiny CPU tensors.
The interpreter rounds float32 to bfloat16 by truncation (the GPU rounds to nearest even), so Triton's bfloat16 is
tested on the GPU only.
"""

import os
import subprocess
import sys
from itertools import permutations

import pytest
import torch

from blitzdiff.kernels import group_norm, group_norm_ref
from blitzdiff.kernels._backends import triton_interpreted
from blitzdiff.kernels.group_norm import _channels_last, auto_backend

TRITON_DEVICE = "cpu" if triton_interpreted() else "cuda"  # tests/conftest.py picks the mode

# (shape, groups): 3 and 4 groups of 12 channels; one group of 59; 8 channels in 2 groups over 45x47 positions
# (several CPU chunks, both layouts, with tails); SD's 32 groups of 2 over 33x17.
SHAPES = [((2, 12, 5, 7), 3), ((2, 12, 5, 7), 4), ((1, 59, 3, 5), 1), ((2, 8, 45, 47), 2), ((2, 64, 33, 17), 32)]
TINY_SHAPES = SHAPES[:3]  # for Triton's interpreter
FUSIONS = {  # which optional inputs are passed
    "plain": (),
    "affine": ("weight", "bias"),
    "adagn_silu": ("weight", "bias", "scale", "shift", "silu"),
    "all": ("weight", "bias", "scale", "shift", "silu", "residual"),
    "silu_residual": ("silu", "residual"),
}


def make_inputs(shape, groups, dtype, fusion="all", layout="nchw", device="cpu", seed=0, mean=0.5, std=2.0):
    """(args, kwargs) of a group_norm call: x ~ N(mean, std^2), the fused inputs of `fusion`, in `layout`."""
    g = torch.Generator().manual_seed(seed)
    batch, channels = shape[:2]

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)

    x = randn(*shape, scale=std, shift=mean)
    present = FUSIONS[fusion]
    weight = randn(channels, scale=0.5, shift=1.0) if "weight" in present else None
    bias = randn(channels) if "bias" in present else None
    kwargs = {
        "scale": randn(batch, channels, scale=0.3) if "scale" in present else None,
        "shift": randn(batch, channels) if "shift" in present else None,
        "silu": "silu" in present,
        "residual": randn(*shape) if "residual" in present else None,
    }
    if layout == "channels_last":
        x = to_channels_last(x)
        kwargs["residual"] = None if kwargs["residual"] is None else to_channels_last(kwargs["residual"])
    return (x, groups, weight, bias, 1e-5), kwargs


def to_channels_last(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)  # any rank; torch.channels_last for 4-D


def widened(args, kwargs):
    """The same call on float64 copies of every tensor (values unchanged)."""
    promote = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    return promote, {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def assert_within_budget(out, args, kwargs):
    wide_args, wide_kwargs = widened(args, kwargs)
    exact = group_norm_ref(*wide_args, **wide_kwargs)
    ref = group_norm_ref(*args, **kwargs)
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + torch.finfo(out.dtype).eps * exact.abs().max().item(), (err, ref_err)


def check_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        assert out.movedim(1, -1).is_contiguous()  # channels-last in, channels-last out
    else:
        assert out.is_contiguous()


# --- CPU kernel ---


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_cpu_within_2x_pytorch_error(shape, groups, dtype, fusion, layout):
    args, kwargs = make_inputs(shape, groups, dtype, fusion, layout)
    out = group_norm(*args, **kwargs, backend="cpu")
    check_layout(out, args[0])
    assert_within_budget(out, args, kwargs)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_large_mean_keeps_the_variance(dtype, layout):
    # mean / std = 200: one-pass E[x^2] - mean^2 in float32 would lose most digits of the variance.
    args, kwargs = make_inputs((2, 8, 45, 47), 2, dtype, "affine", layout, mean=1000.0, std=5.0)
    assert_within_budget(group_norm(*args, **kwargs, backend="cpu"), args, kwargs)


def test_cpu_other_ranks_and_strided_inputs():
    for shape in [(3, 12), (2, 12, 37), (2, 12, 3, 4, 5)]:  # [B, C], [B, C, L] and [B, C, D, H, W]
        args, kwargs = make_inputs(shape, 4, torch.float32)
        out = group_norm(*args, **kwargs, backend="cpu")
        check_layout(out, args[0])
        assert_within_budget(out, args, kwargs)
        cl_args = (to_channels_last(args[0]), *args[1:])  # rank-generic channels-last: kept for 3-D and 5-D too
        torch.testing.assert_close(group_norm(*cl_args, **kwargs, backend="cpu"), out, rtol=1e-6, atol=1e-6)
    # A view that is neither layout (H and W swapped), a residual in the other layout, scale / shift as the halves
    # of one [B, 2C] projection (strided rows), parameters in float64 (read as the spec's float32).
    args, kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    x = args[0].transpose(2, 3)
    proj = torch.randn(2, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs.update(scale=proj[:, :12], shift=proj[:, 12:], residual=to_channels_last(kwargs["residual"].transpose(2, 3)))
    strided = (x, 3, args[2].double(), args[3].double(), 1e-5)
    out = group_norm(*strided, **kwargs, backend="cpu")
    check_layout(out, x)
    assert_within_budget(out, strided, kwargs)


def test_cpu_mixed_parameter_dtypes_match_the_spec():
    # bfloat16 x with float32 weight / scale: the spec multiplies by the float32 values, and so must the kernel.
    args, kwargs = make_inputs((2, 12, 5, 7), 3, torch.bfloat16, "adagn_silu")
    args = (args[0], 3, args[2].float() * 1.001, args[3], 1e-5)
    kwargs["scale"] = kwargs["scale"].float() / 3
    assert_within_budget(group_norm(*args, **kwargs, backend="cpu"), args, kwargs)


def test_cpu_bitwise_repeatable_and_independent_of_threads():
    args, kwargs = make_inputs((2, 32, 64, 64), 32, torch.float32, "all")  # big enough for two threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = group_norm(*args, **kwargs, backend="cpu")
        torch.set_num_threads(2)
        for _ in range(5):
            assert torch.equal(group_norm(*args, **kwargs, backend="cpu"), single)
    finally:
        torch.set_num_threads(threads)


def test_empty_tensors():
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        args, kwargs = make_inputs(shape, 2, torch.float32)
        assert group_norm(*args, **kwargs, backend="cpu").shape == shape


def test_channels_last_rule_is_a_dense_channels_last_view():
    """_channels_last reads torch's cached memory-format flags for 4-D and 5-D tensors; it must agree with its
    definition (a dense movedim(1, -1) view, and not also contiguous) for every memory order, size-1 dimensions
    (where several layouts are the same memory), empty tensors, 3-D tensors and strided views."""
    shapes = [(2, 3, 4), (2, 3, 4, 5), (1, 3, 1, 5), (2, 1, 4, 5), (2, 3, 1, 1), (1, 1, 1, 1), (0, 3, 4, 5),
              (2, 3, 4, 5, 6), (2, 3, 1, 5, 1)]
    seen = set()
    for shape in shapes:
        base = torch.randn(shape)
        for order in permutations(range(len(shape))):
            inverse = torch.argsort(torch.tensor(order)).tolist()
            dense = base.permute(order).contiguous().permute(inverse)  # shape, laid out in `order`
            for t in (dense, dense[:, :, ::2], dense.transpose(0, 1)):
                expected = t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()
                assert _channels_last(t) == expected, (shape, order, t.stride())
                seen.add(expected)
    assert seen == {True, False}


OPCHECK_CASES = {
    "all": make_inputs((2, 12, 5, 7), 3, torch.float32),
    "plain_bf16_channels_last": make_inputs((2, 8, 3, 5), 2, torch.bfloat16, "plain", "channels_last"),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("backend", ["ref", "cpu", "auto"])
def test_opcheck(backend, case):
    args, kwargs = OPCHECK_CASES[case]
    torch.library.opcheck(torch.ops.blitzdiff.group_norm.default, args, {**kwargs, "backend": backend})


def test_compiles_fullgraph_on_cpu():
    def block(x, weight, bias, scale, shift):
        return group_norm(x * 1.0, 3, weight, bias, 1e-5, scale=scale, shift=shift, silu=True, backend="cpu").sin()

    compiled = torch.compile(block, fullgraph=True)
    (x, _, weight, bias, _), kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    for scale in (kwargs["scale"], kwargs["scale"] * 2):
        expected = block(x, weight, bias, scale, kwargs["shift"])
        torch.testing.assert_close(compiled(x, weight, bias, scale, kwargs["shift"]), expected)


# --- dispatch, errors, gradients ---


def test_auto_picks_the_compiled_kernel_where_it_can():
    (x, *_), kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    assert auto_backend(x) == "cpu"
    assert auto_backend(x.bfloat16()) == "cpu"
    assert auto_backend(x.half()) == "ref" and auto_backend(x.double()) == "ref"  # the CPU kernel's dtypes only
    assert auto_backend(x, kwargs["residual"].double()) == "ref"  # the kernels add a residual of x's dtype only
    assert auto_backend(x.requires_grad_()) == "ref"
    with torch.no_grad():
        assert auto_backend(x) == "cpu"


def _replace(args, i, value):
    return (*args[:i], value, *args[i + 1:])


BAD_INPUTS = {
    # name: (change to valid (args, kwargs), backend, what the message must mention)
    "groups": (lambda a, k: (_replace(a, 1, 5), k), "ref", "divide the 12 channels"),
    "weight_shape": (lambda a, k: (_replace(a, 2, a[2][:-1]), k), "cpu", r"weight must have shape \(12,\)"),
    "scale_shape": (lambda a, k: (a, {**k, "scale": k["scale"][:1]}), "ref", r"scale must have shape \(2, 12\)"),
    "residual_shape": (lambda a, k: (a, {**k, "residual": k["residual"][:, :6]}), "cpu", "residual must have shape"),
    "device": (lambda a, k: (_replace(a, 3, a[3].to("meta")), k), "cpu", "bias is on meta"),
    "integer_x": (lambda a, k: (_replace(a, 0, a[0].long()), k), "ref", "must be a floating"),
    "rank_1": (lambda a, k: (_replace(a, 0, a[0][0, 0, 0]), k), "ref", r"\[B, C, \*spatial\]"),
    "cpu_half": (lambda a, k: ((a[0].half(), *a[1:]), k), "cpu", "takes float32, bfloat16, got torch.float16"),
    "cpu_double": (lambda a, k: ((a[0].double(), *a[1:]), k), "cpu", "takes float32, bfloat16, got torch.float64"),
    "residual_dtype": (lambda a, k: (a, {**k, "residual": k["residual"].double()}), "cpu", "residual in x's dtype"),
    "cuda_on_cpu": (lambda a, k: (a, k), "cuda", "needs tensors on cuda"),
    "unknown": (lambda a, k: (a, k), "fast", "no backend 'fast'; allowed: ref, triton, cuda, cpu, auto"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error(case):
    change, backend, message = BAD_INPUTS[case]
    args, kwargs = change(*make_inputs((2, 12, 5, 7), 3, torch.float32))
    with pytest.raises(ValueError, match=message):
        group_norm(*args, **kwargs, backend=backend)


class _Block(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x, weight, bias, scale, shift):
        return group_norm(x, 3, weight, bias, 1e-5, scale=scale, shift=shift, silu=True, backend=self.backend)


def test_export_sees_the_spec_for_ref_and_one_op_for_kernels():
    # backend="ref" runs group_norm_ref itself, so an exported (ONNX-bound) graph holds standard ops only.
    (x, _, weight, bias, _), kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    inputs = (x, weight, bias, kwargs["scale"], kwargs["shift"])
    for backend, has_op in (("ref", False), ("cpu", True)):
        graph = torch.export.export(_Block(backend), inputs).graph
        targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
        assert any("blitzdiff.group_norm" in t for t in targets) == has_op, targets
        assert any("aten.group_norm" in t for t in targets) != has_op, targets


def test_ref_and_auto_differentiate_and_kernels_refuse_grad():
    args, kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    weight = args[2].clone().requires_grad_()
    args = _replace(args, 2, weight)
    assert auto_backend(args[0], kwargs["residual"], weight) == "ref"  # the kernels have no gradients: the spec
    # The gradient of an independent float64 formulation: torch's GroupNorm, then AdaGN, SiLU and the residual.
    x, groups, _, bias, eps = args
    wide = weight.detach().double().requires_grad_()
    per_sample = (*kwargs["scale"].shape, 1, 1)
    y = torch.nn.functional.group_norm(x.double(), groups, wide, bias.double(), eps)
    y = y * (1 + kwargs["scale"].double().reshape(per_sample)) + kwargs["shift"].double().reshape(per_sample)
    y = torch.nn.functional.silu(y) + kwargs["residual"].double()
    expected = torch.autograd.grad(y.square().sum(), wide)[0]
    for backend in ("ref", "auto"):
        group_norm(*args, **kwargs, backend=backend).square().sum().backward()
        torch.testing.assert_close(weight.grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        weight.grad = None
    with pytest.raises(ValueError, match="not differentiable"):
        group_norm(*args, **kwargs, backend="cpu")
    with torch.no_grad():
        group_norm(*args, **kwargs, backend="cpu")


def test_missing_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # makes `import blitzdiff._C` fail
    args, kwargs = make_inputs((2, 12, 5, 7), 3, torch.float32)
    with pytest.raises(RuntimeError, match="pip install -e"):
        group_norm(*args, **kwargs, backend="cpu")
    assert auto_backend(args[0]) == "ref"
    torch.testing.assert_close(group_norm(*args, **kwargs, backend="auto"), group_norm_ref(*args, **kwargs))


# --- Triton: on the GPU, else interpreted on the CPU ---


TRITON_CASES = [(shape, groups, fusion) for shape, groups in TINY_SHAPES for fusion in ("plain", "all")] + [
    ((1, 4, 40, 40), 1, "adagn_silu"),  # four spatial tiles, the last one partial
    ((1, 130, 3, 3), 1, "all"),  # three channel tiles, the last with 2 of 64 channels
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("shape", "groups", "fusion"), TRITON_CASES)
def test_triton_within_2x_pytorch_error(shape, groups, fusion, dtype, layout):
    args, kwargs = make_inputs(shape, groups, dtype, fusion, layout, device=TRITON_DEVICE)
    out = group_norm(*args, **kwargs, backend="triton")
    check_layout(out, args[0])
    assert_within_budget(out, args, kwargs)
    assert torch.equal(group_norm(*args, **kwargs, backend="triton"), out)


def test_triton_opcheck():
    args, kwargs = make_inputs((2, 12, 5, 7), 4, torch.float32, "all", "channels_last", device=TRITON_DEVICE)
    torch.library.opcheck(torch.ops.blitzdiff.group_norm.default, args, {**kwargs, "backend": "triton"})


# Compiles both kernels for sm_90 (no GPU needed), in both layouts with every flag on, so type errors of the compiled
# path show up where only the interpreter runs. A fresh process: one that imported triton for the interpreter
# cannot compile.
COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blitzdiff.kernels.triton import group_norm as kernels

flags = dict(HAS_W=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True, HAS_RES=True, BLOCK_P=8)
for data, unit_stride in (("*fp16", "stride_s"), ("*bf16", "stride_c")):  # channels-first, channels-last
    for kernel, extra in ((kernels._moments, {}), (kernels._apply, flags)):
        constexprs = {"BLOCK_C": 16, "BLOCK_S": 128, unit_stride: 1, **extra}
        types = {"part_ptr": "*fp32", "eps": "fp32"}
        signature = {name: "constexpr" if name in constexprs else types.get(name, data if name.endswith("_ptr")
                     else "i32") for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
"""


def test_triton_kernels_compile_for_hopper():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


# --- CUDA (skipped by tests/conftest.py where torch.cuda.is_available() is False) ---

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SD_SHAPES = [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32)]  # SD1.5's largest and smallest GroupNorm inputs


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("fusion", ["plain", "adagn_silu", "all"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize(("shape", "groups"), SHAPES + SD_SHAPES)
def test_cuda_within_2x_pytorch_error(shape, groups, dtype, fusion, layout):
    args, kwargs = make_inputs(shape, groups, dtype, fusion, layout, device="cuda")
    out = group_norm(*args, **kwargs, backend="cuda")
    check_layout(out, args[0])
    if dtype == torch.float64:
        torch.testing.assert_close(out, group_norm_ref(*args, **kwargs), rtol=1e-12, atol=1e-12)
    else:
        assert_within_budget(out, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("shape", "groups"), SHAPES + SD_SHAPES)
def test_triton_on_gpu_within_2x_pytorch_error(shape, groups, dtype, layout):
    args, kwargs = make_inputs(shape, groups, dtype, "all", layout, device="cuda")
    out = group_norm(*args, **kwargs, backend="triton")
    check_layout(out, args[0])
    assert_within_budget(out, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_large_mean_and_bitwise_repeatable(backend, dtype):
    args, kwargs = make_inputs((2, 320, 32, 32), 32, dtype, "all", device="cuda", mean=1000.0, std=5.0)
    first = group_norm(*args, **kwargs, backend=backend)
    assert_within_budget(first, args, kwargs)
    for _ in range(10):
        assert torch.equal(group_norm(*args, **kwargs, backend=backend), first)


@pytest.mark.cuda
def test_cuda_auto_side_stream_and_graph_capture():
    args, kwargs = make_inputs((2, 64, 16, 16), 32, torch.float16, "all", "channels_last", device="cuda")
    assert auto_backend(args[0]) == "cuda"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches on torch's current stream, not the default one
        out = group_norm(*args, **kwargs, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, group_norm(*args, **kwargs, backend="cuda"))  # same result from the current stream
    assert_within_budget(out, args, kwargs)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = group_norm(*args, **kwargs, backend="cuda")
    args[0].mul_(2.0)  # replay reads the inputs' memory as it is now
    graph.replay()
    assert_within_budget(captured, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_opcheck(layout):
    args, kwargs = make_inputs((2, 12, 5, 7), 3, torch.float16, "all", layout, device="cuda")
    torch.library.opcheck(torch.ops.blitzdiff.group_norm.default, args, {**kwargs, "backend": "cuda"})
