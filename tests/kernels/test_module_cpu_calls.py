"""The models' direct CPU kernel calls (kernels.group_norm_module_cpu, adaln_modulate_module_cpu,
adaln_gated_residual_module_cpu, timestep_embedding_module_cpu; the GELU's, gelu_tanh_module_cpu, is tested in
test_gelu.py).

A model on the "auto" backend calls the C++ GroupNorm, adaLN, timestep embedding and GELU kernels directly in eager
CPU sampling: the op's dispatch and argument checks cost more than the kernel at batch-1 sizes. The direct call must
give the op's result bit for bit, decline (None) every call the op must run (traced or compiled, a dispatch mode,
gradients, another dtype or layout, no extension), and leave torch.compile on the spec.
"""

from __future__ import annotations

import importlib
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blitzdiff.kernels import adaln_gated_residual, adaln_modulate, group_norm, timestep_embedding
from blitzdiff.kernels.adaln_modulate import adaln_gated_residual_module_cpu, adaln_modulate_module_cpu
from blitzdiff.kernels.group_norm import group_norm_module_cpu
from blitzdiff.kernels.timestep_embedding import timestep_embedding_module_cpu
from blitzdiff.models import set_backend
from blitzdiff.models.dit import DiT
from blitzdiff.models.unet_2d import UNet2DModel

# the modules (blitzdiff.kernels exports functions of the same names)
group_norm_module = importlib.import_module("blitzdiff.kernels.group_norm")
adaln_module = importlib.import_module("blitzdiff.kernels.adaln_modulate")
gelu_module = importlib.import_module("blitzdiff.kernels.gelu")
embedding_module = importlib.import_module("blitzdiff.kernels.timestep_embedding")
attention_module = importlib.import_module("blitzdiff.kernels.attention")


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def gn_inputs(dtype=torch.float32, channels_last=True, per_sample=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 3, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight, bias = torch.randn(16, generator=g).to(dtype), torch.randn(16, generator=g).to(dtype)
    scale, shift = torch.randn(2, 32, generator=g).to(dtype).chunk(2, dim=1) if per_sample else (None, None)
    return x, weight, bias, {"scale": scale, "shift": shift}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_direct_call_is_the_ops_result(dtype, channels_last, per_sample, silu):
    x, weight, bias, fused = gn_inputs(dtype, channels_last, per_sample)
    direct = group_norm_module_cpu(x, 4, weight, bias, 1e-5, silu=silu, **fused)
    op = group_norm(x, 4, weight, bias, 1e-5, silu=silu, backend="cpu", **fused)
    assert direct is not None and torch.equal(direct, op) and direct.stride() == op.stride()


def test_adaln_direct_call_is_the_ops_result():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 37, generator=g)
    shift, scale = torch.randn(2, 6 * 37, generator=g).chunk(6, dim=1)[:2]  # row stride 6D, as a DiT block's
    direct = adaln_modulate_module_cpu(x, shift, scale, 1e-6)
    assert direct is not None and torch.equal(direct, adaln_modulate(x, shift, scale, 1e-6, backend="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_residual_direct_call_is_torchs_result(dtype):
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(2, 5, 37, generator=g, dtype=dtype) for _ in range(2))
    gate = torch.randn(2, 6 * 37, generator=g, dtype=dtype).chunk(6, dim=1)[2]  # row stride 6D, as a DiT block's
    direct = adaln_gated_residual_module_cpu(x, y, gate)
    assert direct is not None and torch.equal(direct, adaln_gated_residual(x, y, gate, backend="cpu"))
    assert torch.equal(direct, x + gate[:, None] * y)  # the DiT block's own torch ops, bit for bit
    assert adaln_gated_residual_module_cpu(x, y.transpose(0, 1).contiguous().transpose(0, 1), gate) is None
    assert adaln_gated_residual_module_cpu(x, y[:, :4], gate) is None  # y's shape differs


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [320, 7, 0])
def test_timestep_embedding_direct_call_is_the_ops_result(dtype, dim):
    t = torch.tensor([0, 1, 999, 500, 3], dtype=dtype)[::2]  # strided, as an expanded or sliced timestep can be
    for flip, shift in ((True, 0.0), (False, 1.0)):
        direct = timestep_embedding_module_cpu(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        op = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, backend="cpu")
        assert direct is not None and direct.dtype == torch.float32 and torch.equal(direct, op)


def test_timestep_embedding_direct_call_declines_what_the_op_must_run():
    t = torch.tensor([1.0, 500.0])
    assert timestep_embedding_module_cpu(t, 8) is not None
    for declined in (t[None], t.half(), t.requires_grad_()):  # 2-D; a dtype the kernel reads by copy; gradients
        assert timestep_embedding_module_cpu(declined, 8) is None
    with PassThrough():
        assert timestep_embedding_module_cpu(t.detach(), 8) is None


def test_direct_calls_show_in_profiles_as_the_op():
    x, weight, bias, fused = gn_inputs()
    shift, scale = torch.randn(2, 22).chunk(2, dim=1)
    with torch.profiler.profile() as prof:
        assert group_norm_module_cpu(x, 4, weight, bias, 1e-5, **fused) is not None
        assert adaln_modulate_module_cpu(torch.randn(2, 3, 11), shift, scale, 1e-6) is not None
        assert timestep_embedding_module_cpu(torch.tensor([1.0]), 8) is not None
    names = {event.name for event in prof.events()}
    assert {"blitzdiff::group_norm", "blitzdiff::adaln_modulate", "blitzdiff::timestep_embedding"} <= names, names


def test_direct_calls_decline_what_the_op_must_run(monkeypatch):
    x, weight, bias, fused = gn_inputs()
    shift, scale = torch.randn(2, 22).chunk(2, dim=1)
    tokens = torch.randn(2, 3, 11)

    def declined(gn_x=x, gn_weight=weight, ad_x=tokens, ad_shift=shift) -> tuple[bool, bool]:
        return (group_norm_module_cpu(gn_x, 4, gn_weight, bias, 1e-5, **fused) is None,
                adaln_modulate_module_cpu(ad_x, ad_shift, scale, 1e-6) is None)

    assert declined() == (False, False)
    with PassThrough():  # a dispatch mode must see the op
        assert declined() == (True, True)
    leaf, leaf_tokens = x.detach().requires_grad_(), tokens.detach().requires_grad_()
    assert declined(gn_x=leaf, ad_x=leaf_tokens) == (True, True)  # gradients: the spec's ops record them
    with torch.no_grad():
        assert declined(gn_x=leaf, ad_x=leaf_tokens) == (False, False)
    assert declined(gn_x=x.double(), ad_x=tokens.half()) == (True, True)  # dtypes the kernels lack
    assert declined(gn_x=x.transpose(2, 3), ad_x=tokens.transpose(0, 1)) == (True, True)  # read by copy
    assert declined(gn_weight=weight.double(), ad_shift=shift.double()) == (True, True)  # mixed dtypes
    monkeypatch.setitem(sys.modules, "blitzdiff._C", None)  # no extension: the op explains it
    assert declined() == (True, True)


def tiny_models():
    unet = UNet2DModel.from_config({
        "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32), "layers_per_block": 1,
        "norm_num_groups": 8, "attention_head_dim": 16, "resnet_time_scale_shift": "scale_shift",
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")})
    dit = DiT.from_config({"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
                           "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, dit):
            for p in model.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return {"unet": (unet.eval(), (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 900]))),
            "dit": (dit.eval(), (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([1, 3])))}


def test_auto_dit_runs_its_gelu_and_gated_residuals_by_the_cpu_kernels():
    model, inputs = tiny_models()["dit"]
    expected = {"blitzdiff::gelu_tanh": 2, "blitzdiff::adaln_gated_residual": 4}  # 2 blocks: 1 MLP, 2 residuals each
    for backend, counts in (("auto", expected), ("ref", dict.fromkeys(expected, 0))):
        set_backend(model, backend)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            model(*inputs)
        names = [event.name for event in prof.events()]
        assert {name: names.count(name) for name in expected} == counts, backend


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_auto_models_call_the_kernels_directly_in_eager_and_trace_the_spec(monkeypatch, name):
    model, inputs = tiny_models()[name]
    set_backend(model, "auto")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*inputs)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    routed = ("group_norm", "adaln", "gelu", "timestep")  # the ops with a direct call: traced as their specs
    assert targets and not any(op in t for t in targets if "blitzdiff" in t for op in routed), targets
    # attention too: the spec's SDPA (the op with the C++ kernel compiled within 1-3% of it, not routed so)
    assert any("scaled_dot_product" in t for t in targets) and not any("blitzdiff.attention" in t for t in targets)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager CPU call went through the op")

    for module, attr in ((group_norm_module, "_group_norm_op"), (adaln_module, "_adaln_modulate_op"),
                         (gelu_module, "_gelu_tanh_op"), (embedding_module, "_embedding_op"),
                         (attention_module, "_attention_op")):
        monkeypatch.setattr(module, attr, refuse)
    with torch.inference_mode():
        out = model(*inputs)
    assert torch.isfinite(out).all()


def test_a_missing_build_is_looked_for_once(monkeypatch):
    """Python does not remember a failed import; _library.native does, so a process without blitzdiff._C does not
    search sys.path again on every kernel call (each "auto" direct call asks)."""
    library = importlib.import_module("blitzdiff.kernels._library")
    monkeypatch.delitem(sys.modules, "blitzdiff._C")
    monkeypatch.setattr(library, "_import_error", None)
    tried = []

    def failing_import(name, *args):
        tried.append(name)
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(library.importlib, "import_module", failing_import)
    x, weight, bias, fused = gn_inputs()
    depths = []
    for _ in range(3):
        with pytest.raises(RuntimeError, match="blitzdiff._C is missing") as raised:
            library.native("group_norm", "cpu")
        assert group_norm_module_cpu(x, 4, weight, bias, 1e-5, **fused) is None
        depths.append(len(traceback.extract_tb(raised.value.__cause__.__traceback__)))
    assert tried == ["blitzdiff._C"]
    assert depths[0] == depths[-1]  # the kept ImportError is chained, not re-raised: its traceback does not grow
