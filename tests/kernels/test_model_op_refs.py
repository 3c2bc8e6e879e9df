"""The specifications of the model ops (group_norm, attention, timestep_embedding, adaln_modulate) against
independent formulations, and their backend switch. Fused backends are tested against these refs (issue 4)."""

import math

import pytest
import torch

from blitzdiff.kernels import adaln_modulate, attention, group_norm, timestep_embedding

GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN, dtype=dtype)


def test_group_norm_is_torch_group_norm_then_adagn_silu_residual():
    x, w, b = randn(2, 12, 5, 7), randn(12), randn(12)
    scale, shift, residual = randn(2, 12), randn(2, 12), randn(2, 12, 5, 7)
    norm = torch.nn.functional.group_norm(x, 3, w, b, 1e-5)
    expected = torch.nn.functional.silu(norm * (1 + scale[:, :, None, None]) + shift[:, :, None, None]) + residual
    out = group_norm(x, 3, w, b, 1e-5, scale=scale, shift=shift, silu=True, residual=residual)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_norm(x, 3, w, b, 1e-5), norm, rtol=1e-5, atol=1e-5)


def test_group_norm_keeps_float32_statistics_for_half_inputs():
    x = randn(2, 8, 16, 16) * 100 + 1000  # a large mean: fp16 sums would lose the variance
    out = group_norm(x.to(torch.bfloat16), 4, None, None, 1e-5)
    assert out.dtype == torch.bfloat16
    exact = torch.nn.functional.group_norm(x.double(), 4, None, None, 1e-5)
    rounded_input = torch.nn.functional.group_norm(x.to(torch.bfloat16).double(), 4, None, None, 1e-5)
    assert (out.double() - rounded_input).abs().max() < 0.02  # one bf16 rounding of values of size ~1
    assert (out.double() - exact).abs().max() < 1.0  # the bf16 input itself already lost a lot; no blow-up


def test_group_norm_channels_last_and_float64():
    x = randn(2, 8, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = group_norm(x, 2, None, None, 1e-6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x.contiguous(), 2, None, None, 1e-6))


def test_attention_is_softmax_of_scaled_scores():
    q, k, v = randn(2, 3, 7, 16, dtype=torch.float64), randn(2, 3, 11, 16, dtype=torch.float64), randn(
        2, 3, 11, 16, dtype=torch.float64)
    for scale in (None, 0.3):
        s = 1 / math.sqrt(16) if scale is None else scale
        expected = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1) @ v
        torch.testing.assert_close(attention(q, k, v, scale), expected)


@pytest.mark.parametrize(("flip", "shift"), [(True, 0.0), (False, 1.0), (True, 1.0)])
def test_timestep_embedding_formula(flip, shift):
    t = torch.tensor([0, 1, 500, 999])
    dim, half = 9, 4
    emb = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=2.0)
    assert emb.shape == (4, 9) and emb.dtype == torch.float32
    for j in range(half):
        arg = 2.0 * t.double() * 10000.0 ** (-j / (half - shift))
        sin_col, cos_col = (half + j, j) if flip else (j, half + j)
        torch.testing.assert_close(emb[:, sin_col].double(), torch.sin(arg), atol=1e-3, rtol=0)
        torch.testing.assert_close(emb[:, cos_col].double(), torch.cos(arg), atol=1e-3, rtol=0)
    assert (emb[:, -1] == 0).all()  # odd dim: zero padding


def test_adaln_modulate_is_layer_norm_scale_shift():
    x, shift, scale = randn(2, 5, 8), randn(2, 8), randn(2, 8)
    expected = torch.nn.functional.layer_norm(x, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(adaln_modulate(x, shift, scale), expected)


@pytest.mark.parametrize("backend", ["triton", "cuda", "fast"])
def test_unbuilt_backend_is_a_clear_error(backend):
    x = randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match=rf"group_norm: no backend '{backend}'.*has: ref"):
        group_norm(x, 2, None, None, 1e-5, backend=backend)
