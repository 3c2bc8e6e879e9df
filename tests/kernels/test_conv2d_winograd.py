"""blitzdiff._C.Conv2dWinograd, the Winograd F(2x2, 3x3) and F(4x4, 3x3) NHWC convolutions
(csrc/conv2d_winograd_cpu.cpp), against F.conv2d (the spec).

Error budget: against F.conv2d in float64 on the same float32 inputs, every element is within the componentwise
bound of the Winograd computation, gamma_(C + r) * (|A^T| sum_c (|G| |g| |G^T|) .* (|B^T| |d| |B|) |A| + |bias|)
(Higham 3.1 per step, magnitudes by the absolute transform matrices; r = 10 roundings outside the products' sum of C
terms for F(2x2): 2 in the input transform, 1 in the weight's, 5 in the output transform and bias, with margin; 16
for F(4x4), whose transforms take 3 per pass), and the largest error is at most TORCH_ERROR_FACTOR times that of
PyTorch's own float32 convolution plus 1e-7 of the output's scale: 4x for F(2x2) (measured 0.7-1.9x), 64x for F(4x4),
whose transforms' coefficients (up to 8 and 1/24) amplify rounding (measured 10-43x at 32-256 channels, the mean
error 5-10x). Both loops run here, the AVX-512 one where this CPU has it and the portable one (`generic=True`)
everywhere.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from blitzdiff.models.conv import WINOGRAD_G, pack_winograd

from .test_conv2d_nhwc import inputs  # (batch, in, out, size, kernel): x, a fan-in-scaled weight, a bias

_C = pytest.importorskip("blitzdiff._C")

KERNEL = (3, 3)
LOOPS = [False, True]  # generic: the AVX-512 loop (where the CPU has it), then the portable one
UNIT_ROUNDOFF = 2.0 ** -24
TILES = [2, 4]  # F(2x2, 3x3) and F(4x4, 3x3)
B_T = {  # the input transforms (csrc/conv2d_winograd.h)
    2: torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64),
    4: torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64),
}
A_T = {  # and the output transforms
    2: torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64),
    4: torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                    dtype=torch.float64),
}
# roundings a value passes outside the products' sum: input transform, weight transform, output transform and bias
TRANSFORM_ROUNDINGS = {2: 10, 4: 16}
# the largest error against a float64 convolution over PyTorch's own float32 one
TORCH_ERROR_FACTOR = {2: 4, 4: 64}


def run(x, weight, bias, padding=(1, 1), *, tile=2, threads=1, generic=False):
    """The kernel's convolution of NCHW-shaped x (any layout) by weight [O, C, 3, 3]; out channels-last."""
    out_channels, in_channels = weight.shape[:2]
    packed = pack_winograd(weight, tile)
    kernel = _C.Conv2dWinograd(in_channels, out_channels, *padding, packed.data_ptr(), tile)
    x = x.contiguous(memory_format=torch.channels_last)
    batch, _, height, width = x.shape
    out = torch.full((batch, out_channels, height + 2 * padding[0] - 2, width + 2 * padding[1] - 2),
                     float("nan")).contiguous(memory_format=torch.channels_last)
    kernel.run(out.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), batch, height, width, threads,
               generic)
    return out


def winograd_magnitude(x, weight, bias, padding, tile):
    """|A^T| sum_c (|G| |g| |G^T|) .* (|B^T| |d| |B|) |A| + |bias| in float64, cropped to the output's size."""
    batch, _, height, width = x.shape
    out_h, out_w = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    tiles_h, tiles_w, n = -(-out_h // tile), -(-out_w // tile), tile + 2
    padded = F.pad(x.double().abs(), (padding[1], tile * tiles_w + 2 - width - padding[1],
                                      padding[0], tile * tiles_h + 2 - height - padding[0]))
    patches = padded.unfold(2, n, tile).unfold(3, n, tile)  # [B, C, tiles_h, tiles_w, n, n]
    v = torch.einsum("ik,bcyxkl,jl->bcyxij", B_T[tile].abs(), patches, B_T[tile].abs())
    g = torch.tensor(WINOGRAD_G[tile], dtype=torch.float64).abs()
    u = torch.einsum("ik,ockl,jl->ocij", g, weight.double().abs(), g)
    y = torch.einsum("ik,boyxkl,jl->boyixj", A_T[tile].abs(), torch.einsum("bcyxij,ocij->boyxij", v, u),
                     A_T[tile].abs())
    y = y.reshape(batch, -1, tile * tiles_h, tile * tiles_w)[:, :, :out_h, :out_w]
    return y if bias is None else y + bias.double().abs()[:, None, None]


def assert_within_budget(out, x, weight, bias, padding=(1, 1), tile=2):
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=padding)
    terms = weight.shape[1] + TRANSFORM_ROUNDINGS[tile]
    gamma = terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)
    error = (out.double() - exact).abs()
    assert out.shape == exact.shape
    bound = gamma * winograd_magnitude(x, weight, bias, padding, tile)
    assert bool((error <= bound).all()), (error - bound).max().item()
    torch_error = (F.conv2d(x, weight, bias, padding=padding).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert error.max().item() <= TORCH_ERROR_FACTOR[tile] * torch_error + 1e-7 * scale, (error.max().item(),
                                                                                          torch_error)


GEOMETRIES = [  # (batch, in, out, (H, W), padding)
    (1, 32, 32, (16, 16), (1, 1)),    # unet-digits' 16x16 convolutions: 64 tiles, two full blocks
    (1, 32, 1, (16, 16), (1, 1)),     # conv_out: one output channel (15 masked lanes)
    (1, 64, 64, (4, 4), (1, 1)),      # every tile at the border
    (2, 17, 33, (7, 5), (1, 1)),      # odd everything: partial channel vectors, a partial block, half tiles
    (3, 16, 48, (11, 13), (0, 1)),    # padding only in W, odd output rows
    (1, 20, 16, (9, 8), (2, 2)),      # padding wider than the kernel reach: zero-input tiles
    (1, 16, 16, (1, 1), (1, 1)),      # a 1x1 image padded to 3x3: one output pixel
    (1, 1, 5, (3, 3), (0, 0)),        # one input channel, one tile, no padding
    (9, 96, 40, (8, 8), (1, 1)),      # 144 tiles over several chunks and threads
]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("generic", LOOPS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_float64_conv_within_the_winograd_bound(geometry, generic, tile):
    batch, cin, cout, size, padding = geometry
    x, weight, bias = inputs(batch, cin, cout, size, KERNEL)
    out = run(x, weight, bias, padding, tile=tile, threads=2, generic=generic)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_budget(out, x, weight, bias, padding, tile)


@pytest.mark.parametrize("tile", TILES)
def test_large_inputs_stay_within_budget(tile):
    """Inputs of magnitude 1e3 and a 256-channel sum: the bound scales with the magnitudes, not a fixed tolerance."""
    x, weight, bias = inputs(1, 256, 32, (6, 6), KERNEL)
    x = x * 1e3
    assert_within_budget(run(x, weight, bias, tile=tile), x, weight, bias, tile=tile)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("generic", LOOPS)
def test_no_bias_and_a_bias_of_zeros_agree_bitwise(generic, tile):
    x, weight, _ = inputs(2, 16, 24, (6, 6), KERNEL)
    without = run(x, weight, None, tile=tile, generic=generic)
    assert torch.equal(without, run(x, weight, torch.zeros(24), tile=tile, generic=generic))
    assert_within_budget(without, x, weight, None, tile=tile)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("generic", LOOPS)
def test_same_bits_for_any_thread_count_and_batch_composition(generic, tile):
    """Each tile is computed alone (its chunk changes with the thread count, its arithmetic does not), so neither the
    split over threads nor a sample's batch-mates change a bit."""
    x, weight, bias = inputs(4, 32, 64, (16, 16), KERNEL)
    one = run(x, weight, bias, tile=tile, threads=1, generic=generic)
    for threads in (2, 3, 7):
        assert torch.equal(run(x, weight, bias, tile=tile, threads=threads, generic=generic), one)
    for b in range(4):
        assert torch.equal(run(x[b:b + 1], weight, bias, tile=tile, generic=generic), one[b:b + 1])


@pytest.mark.parametrize("tile", TILES)
def test_the_two_loops_agree_to_rounding(tile):
    """The transforms run the same operations in both loops, and the products' sums have one chain per output in
    both (the AVX-512 one fused): within rounding of each other."""
    x, weight, bias = inputs(1, 64, 40, (8, 8), KERNEL)
    torch.testing.assert_close(run(x, weight, bias, tile=tile), run(x, weight, bias, tile=tile, generic=True),
                               rtol=1e-5, atol=1e-5)


def test_writes_only_its_output():
    """The output sits between guard zones that stay untouched, as does a batch-0 call's; the input and the
    transformed weight are never written."""
    x, weight, bias = inputs(1, 16, 20, (5, 5), KERNEL)
    packed = pack_winograd(weight)
    kernel = _C.Conv2dWinograd(16, 20, 1, 1, packed.data_ptr())
    x_cl = x.contiguous(memory_format=torch.channels_last)
    before = (x_cl.clone(), packed.clone())
    guard = torch.full((2, 20 * 25 + 16), 7.0)
    kernel.run(guard[0, 8:].data_ptr(), x_cl.data_ptr(), bias.data_ptr(), 1, 5, 5, 2)
    assert torch.equal(guard[0, :8], torch.full((8,), 7.0)) and torch.equal(guard[0, -8:], torch.full((8,), 7.0))
    kernel.run(guard[1].data_ptr(), x_cl.data_ptr(), bias.data_ptr(), 0, 5, 5, 2)
    assert torch.equal(guard[1], torch.full((20 * 25 + 16,), 7.0))
    assert torch.equal(x_cl, before[0]) and torch.equal(packed, before[1])


@pytest.mark.parametrize("args, message", [
    ((0, 8, 1, 1, 64), "in_channels and out_channels must be >= 1, got 0, 8"),
    ((8, 0, 1, 1, 64), "in_channels and out_channels must be >= 1, got 8, 0"),
    ((8, 8, -1, 1, 64), "padding must be >= 0, got -1, 1"),
    ((8, 8, 1, 1, 64, 3), "tile must be 2 or 4, got 3"),
])
def test_bad_geometry_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        _C.Conv2dWinograd(*args)


def test_bad_calls_are_refused_and_write_nothing():
    with pytest.raises(ValueError, match="packed_weight must be a non-null pointer"):
        _C.Conv2dWinograd(8, 8, 1, 1, 0)
    x, weight, _ = inputs(1, 8, 8, (4, 4), KERNEL)
    packed = pack_winograd(weight)
    kernel = _C.Conv2dWinograd(8, 8, 0, 0, packed.data_ptr())
    out = torch.full((8 * 4 * 4,), 7.0)
    x_ptr = x.contiguous(memory_format=torch.channels_last).data_ptr()
    bad = [
        ((out.data_ptr(), x_ptr, 0, 1, 2, 4, 1), r"the padded input \(2x4\) is smaller than the 3x3 kernel"),
        ((out.data_ptr(), x_ptr, 0, 1, 0, 4, 1), "height and width must be >= 1, got 0, 4"),
        ((out.data_ptr(), x_ptr, 0, -1, 4, 4, 1), "batch must be >= 0, got -1"),
        ((out.data_ptr(), x_ptr, 0, 1, 4, 4, 0), "threads must be >= 1, got 0"),
        ((0, x_ptr, 0, 1, 4, 4, 1), "out and x must be non-null pointers"),
        ((out.data_ptr(), 0, 0, 1, 4, 4, 1), "out and x must be non-null pointers"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            kernel.run(*args)
    assert torch.equal(out, torch.full((8 * 4 * 4,), 7.0))


@pytest.mark.parametrize("tile", TILES)
def test_pack_winograd_layout(tile):
    """[O, C, 3, 3] -> [n^2, ceil(O / 16), C, 16] (n = tile + 2): (G g G^T)[i, j] of (o, c) at [n i + j, o // 16, c,
    o % 16]."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(20, 3, 3, 3, generator=g)
    packed = pack_winograd(weight.contiguous(memory_format=torch.channels_last), tile)  # any layout of the weight
    n = tile + 2
    assert packed.shape == (n * n, 2, 3, 16) and packed.is_contiguous() and packed.dtype == torch.float32
    G = torch.tensor(WINOGRAD_G[tile], dtype=torch.float64)
    for o, c in itertools.product(range(20), range(3)):
        u = (G @ weight[o, c].double() @ G.T).float()  # rounded once from float64
        for i, j in itertools.product(range(n), range(n)):
            torch.testing.assert_close(packed[n * i + j, o // 16, c, o % 16], u[i, j], rtol=2 ** -23, atol=0)
    assert not packed[:, 1, :, 4:].any()  # lanes past O are zero
