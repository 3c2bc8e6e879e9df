"""The specifications of the model ops (group_norm, attention, timestep_embedding, adaln_modulate) against
independent formulations, and the backend switch of every model op. Fused backends are tested against these refs
(issue 4)."""

import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blitzdiff.kernels import (
    adaln_gated_residual,
    adaln_modulate,
    attention,
    group_norm,
    solver_step,
    timestep_embedding,
    timestep_mlp,
)
from blitzdiff.kernels.adaln_modulate import BACKENDS as ADALN_BACKENDS
from blitzdiff.kernels.attention import BACKENDS as ATTENTION_BACKENDS
from blitzdiff.kernels.group_norm import BACKENDS as GROUP_NORM_BACKENDS
from blitzdiff.kernels.solver_step import BACKENDS as SOLVER_STEP_BACKENDS
from blitzdiff.kernels.timestep_embedding import BACKENDS as TIMESTEP_BACKENDS

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


def model_op_call(op):
    """(the op's BACKENDS, call(backend)) for model op `op` on small valid float32 inputs."""
    x, shift, scale = randn(2, 5, 8), randn(2, 8), randn(2, 8)
    q, t, w1, w2 = randn(1, 2, 3, 16), torch.tensor([1, 500]), randn(6, 8), randn(4, 6)
    calls = {
        "group_norm": (GROUP_NORM_BACKENDS, lambda b: group_norm(randn(1, 4, 2, 2), 2, None, None, 1e-5, backend=b)),
        "attention": (ATTENTION_BACKENDS, lambda b: attention(q, q, q, backend=b)),
        "adaln_modulate": (ADALN_BACKENDS, lambda b: adaln_modulate(x, shift, scale, backend=b)),
        "adaln_gated_residual": (ADALN_BACKENDS, lambda b: adaln_gated_residual(x, x, shift, backend=b)),
        "timestep_embedding": (TIMESTEP_BACKENDS, lambda b: timestep_embedding(t, 8, backend=b)),
        "timestep_mlp": (TIMESTEP_BACKENDS, lambda b: timestep_mlp(t, w1, None, w2, None, backend=b)),
        "solver_step": (SOLVER_STEP_BACKENDS,
                        lambda b: solver_step(shift, scale, c_skip=1.0, c_out=-0.5, a=0.9, b=(0.1,), backend=b)[1]),
    }
    return calls[op]


MODEL_OPS = ["group_norm", "attention", "adaln_modulate", "adaln_gated_residual", "timestep_embedding", "timestep_mlp",
             "solver_step"]


@pytest.mark.parametrize("backend", ["fast", "no-such-backend"])
@pytest.mark.parametrize("op", MODEL_OPS)
def test_unknown_backend_is_a_clear_error(op, backend):
    backends, call = model_op_call(op)
    assert {"ref", "auto"} <= set(backends)
    with pytest.raises(ValueError, match=re.escape(f"{op}: no backend '{backend}'; allowed: {', '.join(backends)}")):
        call(backend)
    for name in ("ref", "auto"):  # the names every model op has, on the same inputs
        assert torch.isfinite(call(name)).all()


class OpNamespaces(TorchDispatchMode):
    """Records the namespace of every op dispatched while it is active (ops inside an op's kernel are not seen)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", MODEL_OPS)
def test_ref_runs_the_spec_and_other_backends_the_op(op):
    # "ref" calls the spec's PyTorch ops directly (export, autograd and torch.compile see standard ops); every other
    # backend, "auto" included, goes through the registered blitzdiff op.
    _, call = model_op_call(op)
    for backend, through_op in (("ref", False), ("auto", True)):
        with OpNamespaces() as mode:
            call(backend)
        assert ("blitzdiff" in mode.seen) == through_op, (backend, mode.seen)
        assert "aten" in mode.seen or through_op
