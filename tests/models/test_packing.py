"""Packed q / k / v projections (models.packing): one GEMM in eager inference, the separate layers' results, and never
stale weights.

blitzdiff.load packs every self-attention module's to_q / to_k / to_v into one weight buffer whose views are the
layers' parameters. The references here are the same modules unpacked (or fresh models loaded with the same
weights), run through their three nn.Linear layers.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import blitzdiff
from blitzdiff.models import pack_projections
from blitzdiff.models.dit import Attention as DiTAttention
from blitzdiff.models.dit import DiT
from blitzdiff.models.layers import Attention, BasicTransformerBlock, ResnetBlock2D
from blitzdiff.models.packing import PackedParameters
from blitzdiff.models.unet_2d import UNet2DModel


def modules_and_inputs():
    g = torch.Generator().manual_seed(0)
    spatial = Attention(32, heads=2, dim_head=16, bias=True, norm_num_groups=8, residual_connection=True)
    tokens = DiTAttention(48, heads=3, head_dim=16, bias=True)
    for module in (spatial, tokens):
        for p in module.parameters():
            nn.init.normal_(p, generator=g)
    return [(spatial, torch.randn(2, 32, 4, 5, generator=g)), (tokens, torch.randn(2, 7, 48, generator=g))]


def unpacked(module: nn.Module) -> nn.Module:
    """A copy running the three layers (deepcopy gives parameters of their own memory)."""
    twin = copy.deepcopy(module)
    twin._packed = None
    return twin


def linear_calls(module: nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile() as prof:
        module(x)
    return sum(1 for event in prof.events() if event.name == "aten::linear")


@pytest.mark.parametrize("case", [0, 1])
def test_packed_projections_give_the_separate_layers_result_with_one_gemm(case):
    module, x = modules_and_inputs()[case]
    reference = unpacked(module)
    pack_projections(module)
    assert module._packed is not None
    with torch.inference_mode():
        packed_out, separate_out = module(x), reference(x)
        assert linear_calls(module, x) == 2 and linear_calls(reference, x) == 4  # q/k/v (+ out) against q, k, v, out
    torch.testing.assert_close(packed_out, separate_out, rtol=1e-6, atol=1e-6)


def test_parameters_keep_their_names_values_and_state_dict():
    module, _ = modules_and_inputs()[1]
    before = {name: t.clone() for name, t in module.state_dict().items()}
    pack_projections(module)
    after = module.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    weight = module._packed.buffers[0]
    q, k, v = module.to_q.weight, module.to_k.weight, module.to_v.weight
    assert isinstance(q, nn.Parameter) and q.requires_grad  # still trainable parameters, views of the buffer
    assert k.data_ptr() == weight.data_ptr() + q.numel() * q.element_size()
    assert v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()


def test_in_place_loads_keep_the_packing_and_use_the_new_weights():
    module, x = modules_and_inputs()[1]
    pack_projections(module)
    new = {name: torch.randn_like(t) for name, t in module.state_dict().items()}
    module.load_state_dict(new)  # copies into the views
    fresh = DiTAttention(48, heads=3, head_dim=16, bias=True)
    fresh.load_state_dict(new)
    with torch.inference_mode():
        assert module._packed.tensors() is not None
        torch.testing.assert_close(module(x), fresh(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", ["new_parameter", "assign_load", "to_float64"])
def test_moved_or_replaced_parameters_turn_the_packing_off(how):
    module, x = modules_and_inputs()[1]
    pack_projections(module)
    if how == "new_parameter":
        module.to_k.weight = nn.Parameter(torch.randn_like(module.to_k.weight))
    elif how == "assign_load":
        module.load_state_dict({name: torch.randn_like(t) for name, t in module.state_dict().items()}, assign=True)
    else:
        module.to(torch.float64)
        x = x.double()
        assert module._packed is None  # _apply drops the buffers at once
    with torch.inference_mode():
        out = module(x)
        assert module._packed is None
        torch.testing.assert_close(out, unpacked(module)(x), rtol=1e-6, atol=1e-6)


def test_a_memory_format_change_keeps_the_packing():
    """pipe.compile(channels_last=...) converts the model's 4-D weights with model.to(memory_format=...): the packed
    2-D weights stay where they are, and so does the packing."""
    pipe = blitzdiff.load("unet-digits")
    pipe.compile("eager", channels_last=False)
    attentions = [m for m in pipe.model.modules() if isinstance(m, Attention)]
    assert attentions and all(m._packed is not None and m._packed.tensors() is not None for m in attentions)
    dit = random_dit()
    pack_projections(dit)
    dit.to(memory_format=torch.channels_last)
    assert dit._packed_conditioning is not None


def test_training_records_gradients_on_the_layers_parameters():
    module, x = modules_and_inputs()[1]
    pack_projections(module)
    module(x).square().sum().backward()
    reference = unpacked(modules_and_inputs()[1][0])
    reference(x).square().sum().backward()
    for name in ("to_q", "to_k", "to_v"):
        grad, expected = getattr(module, name).weight.grad, getattr(reference, name).weight.grad
        assert grad is not None
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_is_not_packed():
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=24)
    pack_projections(block)
    assert block.attn1._packed is not None and block.attn2._packed is None


def test_layers_of_different_widths_are_refused():
    with pytest.raises(ValueError, match="one shape past dim 0"):
        PackedParameters([nn.Linear(8, 4), nn.Linear(6, 4)], ("weight",))
    with pytest.raises(ValueError, match="every module needs a 'bias'"):
        PackedParameters([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)], ("weight", "bias"))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """model with every parameter drawn from N(0, 0.3^2): layers of one kind all differ."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3, generator=g)
    return model


def random_dit() -> DiT:
    """A 3-block DiT whose blocks' embedders all differ (diffusers' converter copies one into all of them; the
    packed path must still read block i's own)."""
    return randomized(DiT.from_config({"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                                       "out_channels": 8, "num_layers": 3, "sample_size": 8, "patch_size": 2,
                                       "num_embeds_ada_norm": 10}), 3)


def dit_inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.tensor([3, 10])


def calls(module: nn.Module, inputs, name: str) -> int:
    with torch.profiler.profile() as prof:
        module(*inputs)
    return sum(1 for event in prof.events() if event.name == name)


def test_dit_conditioning_packed_gives_each_blocks_own_result():
    dit, inputs = random_dit(), dit_inputs()
    reference = copy.deepcopy(dit)  # unpacked: its parameters have their own memory
    pack_projections(dit)
    assert dit._packed_conditioning is not None and reference._packed_conditioning is None
    with torch.inference_mode():
        torch.testing.assert_close(dit(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5)
        assert calls(dit, inputs, "aten::baddbmm") == 2 and calls(reference, inputs, "aten::baddbmm") == 0
        assert calls(dit, inputs, "aten::linear") == calls(reference, inputs, "aten::linear") - 3 * 3 - 3 * 2 + 1


@pytest.mark.parametrize("how", ["new_parameter", "to_float64"])
def test_dit_conditioning_turns_off_when_parameters_move(how):
    dit, (x, t, y) = random_dit(), dit_inputs()
    pack_projections(dit)
    if how == "new_parameter":
        block = dit.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2
        block.weight = nn.Parameter(torch.randn_like(block.weight))
    else:
        dit.to(torch.float64)
        x = x.double()
        assert dit._packed_conditioning is None
    with torch.inference_mode():
        out = dit(x, t, y)
        assert dit._packed_conditioning is None
        reference = copy.deepcopy(dit)
        for module in reference.modules():
            if hasattr(module, "_packed"):
                module._packed = None
        torch.testing.assert_close(out, reference(x, t, y), rtol=1e-6, atol=1e-6)


def random_unet(time_norm: str) -> UNet2DModel:
    """A small UNet2DModel whose resnets' time projections all differ (a packed resnet must read its own columns)."""
    return randomized(UNet2DModel.from_config({
        "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4, "attention_head_dim": 8, "resnet_time_scale_shift": time_norm}), 5)


def unet_inputs():
    g = torch.Generator().manual_seed(6)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10.0, 700.0])


@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_unet_time_projections_packed_give_each_resnets_own_result(time_norm):
    unet, inputs = random_unet(time_norm), unet_inputs()
    reference = copy.deepcopy(unet)  # unpacked
    pack_projections(unet)
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert unet._packed_time is not None and len(resnets) == 8 and reference._packed_time is None
    with torch.inference_mode():
        torch.testing.assert_close(unet(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5)
        # 8 time projections as one GEMM (the attention blocks' q / k / v packing removes 2 per attention)
        attentions = sum(isinstance(m, Attention) for m in unet.modules())
        assert calls(unet, inputs, "aten::linear") == calls(reference, inputs, "aten::linear") - 7 - 2 * attentions
    # with gradients on (training) the layers run themselves: the same result, and gradients reach each layer
    out = unet(*inputs)
    torch.testing.assert_close(out, reference(*inputs), rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(r.time_emb_proj.weight.grad is not None and r.time_emb_proj.weight.grad.abs().sum() > 0
               for r in resnets)


@pytest.mark.parametrize("how", ["new_parameter", "to_float64", "load_state_dict"])
def test_unet_time_projections_follow_their_parameters(how):
    unet, (x, t) = random_unet("default"), unet_inputs()
    pack_projections(unet)
    layer = unet.up_blocks[1].resnets[0].time_emb_proj
    if how == "new_parameter":
        layer.weight = nn.Parameter(torch.randn_like(layer.weight))
    elif how == "to_float64":
        unet.to(torch.float64)
        x = x.double()
        assert unet._packed_time is None
    else:  # in place: the packing stays and reads the new values
        state = unet.state_dict()
        state["up_blocks.1.resnets.0.time_emb_proj.weight"] = torch.randn_like(layer.weight)
        unet.load_state_dict(state)
    with torch.inference_mode():
        out = unet(x, t)
        assert (unet._packed_time is None) == (how != "load_state_dict")
        reference = copy.deepcopy(unet)
        reference._packed_time = None
        torch.testing.assert_close(out, reference(x, t), rtol=1e-5, atol=1e-5)


def test_loaded_pipelines_are_packed_and_sample_as_unpacked_ones():
    pipe = blitzdiff.load("dit-digits")
    assert all(m._packed is not None for m in pipe.model.modules() if isinstance(m, DiTAttention))
    reference = blitzdiff.load("dit-digits")
    for module in reference.model.modules():
        if isinstance(module, DiTAttention):
            module._packed = None
    options = {"steps": 4, "seeds": 5, "class_labels": [1, 7], "output_type": "raw", "progress": False}
    torch.testing.assert_close(pipe.sample(2, **options), reference.sample(2, **options), rtol=1e-5, atol=1e-5)


PACK_MEMORY = """
import torch
from torch import nn
from blitzdiff.malloc import malloc_record, tune_malloc
from blitzdiff.models.packing import PackedParameters
tune_malloc()  # as every blitzdiff command: freed heap memory would stay with the process
layers = [nn.Linear(2048, 2048, bias=False) for _ in range(8)]  # 16 MiB each: heap blocks, below the mmap threshold
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mib()
PackedParameters(layers, ("weight",))
print(malloc_record()["tuned"], rss_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")
def test_packing_hands_the_old_parameters_back_under_tuned_malloc():
    """Packing frees each old parameter as its view replaces it; under blitzdiff.tune_malloc the heap would keep
    them (8 x 16 MiB here), so packing trims as it goes: the process grows by about one layer, not all of them."""
    result = subprocess.run([sys.executable, "-c", PACK_MEMORY], capture_output=True, text=True, check=True)
    tuned, growth = result.stdout.split()
    if tuned != "True":
        pytest.skip("not glibc: tune_malloc changes nothing here")
    assert float(growth) < 2 * 16, result.stdout
