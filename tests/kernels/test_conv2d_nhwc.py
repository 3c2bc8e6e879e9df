"""blitzdiff._C.Conv2dNhwc, the direct NHWC convolution (csrc/conv2d_cpu.cpp), against F.conv2d (the spec).

Error budget: against F.conv2d in float64 on the same float32 inputs, every element is within the worst-case bound
of a float32 sum of its K = C * KH * KW products and the bias in any order, gamma_(K+1) * (|x| conv |w| + |bias|)
(Higham, "Accuracy and Stability of Numerical Algorithms", 3.1; an FMA rounds once per term, within the same bound);
and the largest error is at most 8x that of PyTorch's own float32 convolution plus 1e-7 of the output's scale (measured:
3-5x, PyTorch's GEMM sums in shorter blocks than the kernel's one chain per output). Both loops run here, the AVX-512
one where this CPU has it and the portable one (`generic=True`) everywhere.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from blitzdiff.models.conv import pack_direct

_C = pytest.importorskip("blitzdiff._C")

LOOPS = [False, True]  # generic: the AVX-512 loop (where the CPU has it), then the portable one
UNIT_ROUNDOFF = 2.0 ** -24


def run(x, weight, bias, stride=(1, 1), padding=(1, 1), *, threads=1, generic=False):
    """The kernel's convolution of NCHW-shaped x (any layout) by weight [O, C, KH, KW]; out channels-last."""
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    packed = pack_direct(weight)
    kernel = _C.Conv2dNhwc(in_channels, out_channels, kernel_h, kernel_w, *stride, *padding, packed.data_ptr())
    x = x.contiguous(memory_format=torch.channels_last)
    batch, _, height, width = x.shape
    out_h = (height + 2 * padding[0] - kernel_h) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel_w) // stride[1] + 1
    out = torch.full((batch, out_channels, out_h, out_w), float("nan")).contiguous(memory_format=torch.channels_last)
    kernel.run(out.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), batch, height, width, threads,
               generic)
    return out


def inputs(batch, in_channels, out_channels, size, kernel, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *size, generator=g)
    weight = torch.randn(out_channels, in_channels, *kernel, generator=g) / (in_channels * kernel[0] * kernel[1]) ** 0.5
    return x, weight, (torch.randn(out_channels, generator=g) if bias else None)


def assert_within_budget(out, x, weight, bias, stride, padding):
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding)
    magnitude = F.conv2d(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs(),
                         stride, padding)
    terms = weight[0].numel() + 1
    gamma = terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)
    error = (out.double() - exact).abs()
    assert out.shape == exact.shape
    assert bool((error <= gamma * magnitude).all()), (error - gamma * magnitude).max().item()
    torch_error = (F.conv2d(x, weight, bias, stride, padding).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert error.max().item() <= 8 * torch_error + 1e-7 * scale, (error.max().item(), torch_error)


GEOMETRIES = [  # (batch, in, out, (H, W), (KH, KW), stride, padding)
    (1, 1, 32, (16, 16), (3, 3), (1, 1), (1, 1)),    # unet-digits' conv_in: one input channel
    (1, 32, 1, (16, 16), (3, 3), (1, 1), (1, 1)),    # conv_out: one output channel (15 masked lanes)
    (1, 64, 64, (8, 8), (3, 3), (1, 1), (1, 1)),     # two full blocks, one tile per row
    (1, 64, 64, (8, 8), (3, 3), (2, 2), (1, 1)),     # Downsample2D
    (1, 96, 32, (16, 16), (1, 1), (1, 1), (0, 0)),   # 1x1 shortcut, no padding copy
    (2, 17, 33, (7, 5), (3, 3), (1, 1), (1, 1)),     # odd everything: a partial block, 7- and 5-pixel tiles
    (3, 5, 48, (11, 13), (5, 3), (2, 1), (2, 0)),    # rectangular kernel, mixed strides, padding only in H
    (1, 8, 16, (20, 19), (3, 3), (1, 1), (3, 2)),    # padding wider than the kernel reach: zero rows of output
    (1, 3, 20, (1, 1), (3, 3), (1, 1), (1, 1)),      # a 1x1 image padded to 3x3
    (1, 4, 40, (9, 9), (2, 2), (3, 3), (0, 0)),      # stride past the kernel: skipped input pixels
]


@pytest.mark.parametrize("generic", LOOPS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_float64_conv_within_the_summation_bound(geometry, generic):
    batch, cin, cout, size, kernel, stride, padding = geometry
    x, weight, bias = inputs(batch, cin, cout, size, kernel)
    out = run(x, weight, bias, stride, padding, generic=generic)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_budget(out, x, weight, bias, stride, padding)


@pytest.mark.parametrize("generic", LOOPS)
def test_no_bias_and_a_bias_of_zeros_agree_bitwise(generic):
    x, weight, _ = inputs(2, 16, 24, (6, 6), (3, 3))
    without = run(x, weight, None, generic=generic)
    zeros = run(x, weight, torch.zeros(24), generic=generic)
    assert torch.equal(without, zeros)
    assert_within_budget(without, x, weight, None, (1, 1), (1, 1))


@pytest.mark.parametrize("generic", LOOPS)
def test_same_bits_for_any_thread_count_and_batch_composition(generic):
    """Each output tile is computed alone, so neither the split over threads nor a sample's batch-mates change a
    bit (the batch-invariance the pipeline relies on within one path)."""
    x, weight, bias = inputs(4, 32, 64, (16, 16), (3, 3))
    one = run(x, weight, bias, threads=1, generic=generic)
    for threads in (2, 3, 7):
        assert torch.equal(run(x, weight, bias, threads=threads, generic=generic), one)
    for b in range(4):
        assert torch.equal(run(x[b:b + 1], weight, bias, generic=generic), one[b:b + 1])


def test_the_two_loops_agree_to_rounding():
    x, weight, bias = inputs(1, 64, 40, (8, 8), (3, 3))
    fast, portable = run(x, weight, bias), run(x, weight, bias, generic=True)
    torch.testing.assert_close(fast, portable, rtol=1e-5, atol=1e-5)


def test_writes_only_its_output():
    """The output rows of a batch-0 call stay untouched; the input and packed weight are never written."""
    x, weight, bias = inputs(1, 16, 20, (5, 5), (3, 3))
    packed = pack_direct(weight)
    kernel = _C.Conv2dNhwc(16, 20, 3, 3, 1, 1, 1, 1, packed.data_ptr())
    x_cl = x.contiguous(memory_format=torch.channels_last)
    before = (x_cl.clone(), packed.clone())
    guard = torch.full((2, 20 * 25 + 16), 7.0)  # the output between two guard zones
    kernel.run(guard[0, 8:].data_ptr(), x_cl.data_ptr(), bias.data_ptr(), 1, 5, 5, 2)
    assert torch.equal(guard[0, :8], torch.full((8,), 7.0)) and torch.equal(guard[0, -8:], torch.full((8,), 7.0))
    assert torch.equal(guard[1], torch.full((20 * 25 + 16,), 7.0))
    kernel.run(guard[1].data_ptr(), x_cl.data_ptr(), bias.data_ptr(), 0, 5, 5, 2)  # batch 0: nothing written
    assert torch.equal(guard[1], torch.full((20 * 25 + 16,), 7.0))
    assert torch.equal(x_cl, before[0]) and torch.equal(packed, before[1])


def test_isa_names_the_loop():
    assert _C.conv2d_nhwc_isa() in ("avx512f", "generic")


@pytest.mark.parametrize("args, message", [
    ((0, 8, 3, 3, 1, 1, 1, 1), "in_channels must be >= 1, got 0"),
    ((8, 0, 3, 3, 1, 1, 1, 1), "out_channels must be >= 1, got 0"),
    ((8, 8, 0, 3, 1, 1, 1, 1), "kernel_h must be >= 1, got 0"),
    ((8, 8, 3, 3, 1, 0, 1, 1), "stride_w must be >= 1, got 0"),
    ((8, 8, 3, 3, 1, 1, -1, 1), "padding must be >= 0, got -1, 1"),
])
def test_bad_geometry_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        _C.Conv2dNhwc(*args, 64)


def test_bad_calls_are_refused_and_write_nothing():
    with pytest.raises(ValueError, match="packed_weight must be a non-null pointer"):
        _C.Conv2dNhwc(8, 8, 3, 3, 1, 1, 1, 1, 0)
    x, weight, bias = inputs(1, 8, 8, (4, 4), (3, 3))
    packed = pack_direct(weight)
    kernel = _C.Conv2dNhwc(8, 8, 3, 3, 1, 1, 0, 0, packed.data_ptr())
    out = torch.full((8 * 4 * 4,), 7.0)
    x_ptr = x.contiguous(memory_format=torch.channels_last).data_ptr()
    bad = [
        ((out.data_ptr(), x_ptr, 0, 1, 2, 4, 1), r"the padded input \(2x4\) is smaller than the kernel \(3x3\)"),
        ((out.data_ptr(), x_ptr, 0, 1, 0, 4, 1), "height must be >= 1, got 0"),
        ((out.data_ptr(), x_ptr, 0, -1, 4, 4, 1), "batch must be >= 0, got -1"),
        ((out.data_ptr(), x_ptr, 0, 1, 4, 4, 0), "threads must be >= 1, got 0"),
        ((0, x_ptr, 0, 1, 4, 4, 1), "out and x must be non-null pointers"),
        ((out.data_ptr(), 0, 0, 1, 4, 4, 1), "out and x must be non-null pointers"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            kernel.run(*args)
    assert torch.equal(out, torch.full((8 * 4 * 4,), 7.0))
    with pytest.raises(TypeError):
        kernel.run(out.data_ptr(), x_ptr, 0, 1, 4.0, 4, 1)  # sizes are ints


def test_pack_direct_layout():
    """[O, C, KH, KW] -> [ceil(O / 16), KH, KW, C, 16]: element (o, c, ky, kx) at [o // 16, ky, kx, c, o % 16]."""
    weight = torch.arange(20 * 3 * 2 * 3, dtype=torch.float32).reshape(20, 3, 2, 3)
    packed = pack_direct(weight.contiguous(memory_format=torch.channels_last))  # any layout of the weight
    assert packed.shape == (2, 2, 3, 3, 16) and packed.is_contiguous()
    for o, c, ky, kx in itertools.product(range(20), range(3), range(2), range(3)):
        assert packed[o // 16, ky, kx, c, o % 16] == weight[o, c, ky, kx]
    assert not packed[1, :, :, :, 4:].any()  # lanes past O are zero
