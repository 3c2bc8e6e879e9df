"""DiT against diffusers' DiTTransformer2DModel, and the original facebookresearch/DiT checkpoint format."""

import re

import pytest
import torch
from diffusers import DiTTransformer2DModel

from blitzdiff.models.dit import DiT, split_learned_sigma
from blitzdiff.models.dit_original import original_dit_config, original_dit_to_diffusers

SMALL = {"num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4, "num_layers": 2, "sample_size": 8,
         "patch_size": 2, "num_embeds_ada_norm": 10}
# The smallest official preset width (DiT-S: 384 = 6 heads x 64), needed where heads are inferred from the width.
SMALL_S = {**SMALL, "num_attention_heads": 6, "attention_head_dim": 64, "out_channels": 8}
XL2_256 = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
           "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000}


def reference(config, seed=0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**config).eval()


def ours_from(ref):
    model = DiT.from_config(dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(batch=3, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=gen)
    timestep = torch.tensor([0.0, 499.5, 999.0][:batch])
    labels = torch.tensor([0, 7, 10][:batch])  # 10 = num_embeds_ada_norm: the null (classifier-free guidance) row
    return sample, timestep, labels


def assert_close(actual, expected, rtol=1e-5):
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("extra", [
    {},  # fixed sigma: out_channels = in_channels
    {"out_channels": 8},  # learned sigma
    {"out_channels": 8, "attention_bias": False, "norm_eps": 0.5},  # eps large enough to matter
], ids=["fixed-sigma", "learned-sigma", "no-attn-bias-eps"])
@pytest.mark.parametrize("size", [8, 12], ids=["train-size", "larger"])  # 12: the position table is rescaled
@torch.no_grad()
def test_matches_diffusers(extra, size):
    ref = reference({**SMALL, **extra})
    model = ours_from(ref)
    sample, timestep, labels = inputs(size=size)
    expected = ref(sample, timestep, labels).sample
    assert expected.abs().max() > 0.1  # random (not zero-initialized) weights: a nontrivial output
    assert_close(model(sample, timestep, class_labels=labels), expected)


@torch.no_grad()
def test_timestep_broadcast():
    ref = reference(SMALL)
    model = ours_from(ref)
    sample, _, labels = inputs()
    expected = ref(sample, torch.full((3,), 500), labels).sample
    for timestep in (500, 500.0, torch.tensor(500), torch.full((3,), 500.0)):
        assert_close(model(sample, timestep, labels), expected)


@torch.no_grad()
def test_split_learned_sigma():
    ref = reference({**SMALL, "out_channels": 8})
    sample, timestep, labels = inputs()
    output = ours_from(ref)(sample, timestep, labels)
    assert output.shape == (3, 8, 8, 8)  # forward returns every channel, as diffusers' .sample
    eps, _ = torch.split(ref(sample, timestep, labels).sample, 4, dim=1)  # what diffusers' DiTPipeline keeps
    assert_close(split_learned_sigma(output, 4), eps)
    fixed = output[:, :4]
    assert split_learned_sigma(fixed, 4) is fixed  # fixed sigma: nothing to split
    with pytest.raises(ValueError, match="channels"):
        split_learned_sigma(output[:, :6], 4)


def to_original(state_dict, depth):
    """Inverse of the original -> diffusers mapping, written independently: diffusers keys -> DiT models.py keys."""
    out = {}
    emb = "transformer_blocks.0.norm1.emb"  # block 0's copy; the caller makes all copies equal
    for kind in ("weight", "bias"):
        out[f"x_embedder.proj.{kind}"] = state_dict[f"pos_embed.proj.{kind}"]
        out[f"t_embedder.mlp.0.{kind}"] = state_dict[f"{emb}.timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = state_dict[f"{emb}.timestep_embedder.linear_2.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = state_dict[f"proj_out_1.{kind}"]
        out[f"final_layer.linear.{kind}"] = state_dict[f"proj_out_2.{kind}"]
        for i in range(depth):
            block = f"transformer_blocks.{i}"
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [state_dict[f"{block}.attn1.to_{p}.{kind}"] for p in "qkv"], dim=0)
            out[f"blocks.{i}.attn.proj.{kind}"] = state_dict[f"{block}.attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = state_dict[f"{block}.ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = state_dict[f"{block}.ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = state_dict[f"{block}.norm1.linear.{kind}"]
    out["y_embedder.embedding_table.weight"] = state_dict[f"{emb}.class_embedder.embedding_table.weight"]
    return out


def shared_embedders(ref):
    """Make every block's timestep / label embedder block 0's: what the original format (one copy) can express."""
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    return ref


@torch.no_grad()
def test_original_checkpoint_roundtrip():
    ref = shared_embedders(reference(SMALL_S))
    original = to_original(ref.state_dict(), depth=2)
    original["pos_embed"] = ref.pos_embed.pos_embed.clone()  # the original stores its fixed table: [1, 16, 384]
    assert not any(key.startswith("transformer_blocks") for key in original)

    config = original_dit_config(original)
    assert config == {**DiT(**SMALL_S).config, "out_channels": 8}
    mapped = original_dit_to_diffusers(original)
    assert mapped.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(mapped[key], value), key

    model = DiT.from_config(config).eval()
    model.load_state_dict(mapped, strict=True)
    sample, timestep, labels = inputs()
    assert_close(model(sample, timestep, labels), ref(sample, timestep, labels).sample)


def test_original_dit_config_inference():
    ref = shared_embedders(reference({**SMALL_S, "num_embeds_ada_norm": 1000, "out_channels": None}))
    original = to_original(ref.state_dict(), depth=2)
    config = original_dit_config(original, image_size=64)  # no pos_embed: the size comes from image_size / 8
    assert (config["sample_size"], config["num_embeds_ada_norm"], config["out_channels"]) == (8, 1000, 4)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]) == (6, 64, 2)
    with pytest.raises(ValueError, match="image_size"):
        original_dit_config(original)
    with pytest.raises(ValueError, match="multiple of 8"):
        original_dit_config(original, image_size=60)
    original["pos_embed"] = torch.zeros(1, 16, 384)  # a 4x4 grid of 2x2 patches: latent 8, image 64
    assert original_dit_config(original)["sample_size"] == 8
    assert original_dit_config(original, image_size=64)["sample_size"] == 8
    with pytest.raises(ValueError, match="contradicts"):
        original_dit_config(original, image_size=128)
    with pytest.raises(ValueError, match="training checkpoint"):
        original_dit_config({"ema": original, "model": original})
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.attn.extra.weight'"):
        original_dit_to_diffusers({**original, "blocks.0.attn.extra.weight": torch.zeros(1)})

    small = to_original(reference(SMALL).state_dict(), depth=2)  # width 32: not a DiT preset
    with pytest.raises(ValueError, match="hidden size 32"):
        original_dit_config(small, image_size=64)


@pytest.mark.parametrize("overrides, match", [
    ({"norm_type": "ada_norm"}, "norm_type"),
    ({"activation_fn": "gelu"}, "activation_fn"),
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
    ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
    ({"num_layers": 0}, "num_layers"),
    ({"out_channels": 0}, "out_channels"),
    ({"num_attention_heads": 1, "attention_head_dim": 6}, "divisible by 4"),
    ({"cross_attention_dim": 768}, "cross_attention_dim"),
    ({"interpolation_scale": 2}, "interpolation_scale"),
    ({"use_foo": 1}, "unknown field 'use_foo'"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        DiT.from_config({**SMALL, **overrides})


def test_config_accepts_legacy_transformer2d_and_private_fields():
    legacy = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0", **XL2_256,
              "cross_attention_dim": None, "num_vector_embeds": None, "use_linear_projection": False,
              "only_cross_attention": False, "double_self_attention": False, "upcast_attention": False,
              "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "activation_fn": "gelu-approximate",
              "attention_bias": True, "dropout": 0.0, "norm_num_groups": 32}
    with torch.device("meta"):
        model = DiT.from_config(legacy)
        reference_config = dict(DiTTransformer2DModel(**XL2_256).config)
    assert model.config == {key: reference_config[key] for key in model.config}
    assert set(model.config) == {key for key in reference_config if not key.startswith("_")}


@torch.no_grad()
def test_bad_inputs():
    model = DiT(**SMALL)
    sample, timestep, labels = inputs()
    with pytest.raises(ValueError, match="class_labels is required"):
        model(sample, timestep)
    with pytest.raises(ValueError, match="class_labels"):
        model(sample, timestep, labels.float())
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(sample, timestep, labels, encoder_hidden_states=torch.zeros(3, 1, 32))
    with pytest.raises(ValueError, match="timestep"):
        model(sample, timestep[:2], labels)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(sample[..., :7], timestep, labels)
    with pytest.raises(ValueError, match="sample must be"):
        model(sample[:, :3], timestep, labels)


@torch.no_grad()
def test_meta_construction_then_assign():
    ref = reference({**SMALL, "out_channels": 8})
    with torch.device("meta"):
        model = DiT.from_config(dict(ref.config))
    assert all(p.is_meta for p in model.parameters()) and not list(model.buffers())
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    sample, timestep, labels = inputs()
    assert_close(model(sample, timestep, labels), ref(sample, timestep, labels).sample)


def test_xl2_parameter_count_on_meta():
    with torch.device("meta"):
        model = DiT(**XL2_256)
        ref = DiTTransformer2DModel(**XL2_256)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert model.state_dict().keys() == ref.state_dict().keys()
    # The paper's DiT-XL/2 count is the original model's: one embedder copy, plus its pos_embed parameter.
    original = to_original(model.state_dict(), depth=28)
    original["pos_embed"] = torch.empty(1, 256, 1152, device="meta")
    assert sum(t.numel() for t in original.values()) == 675_129_632
    # Shapes alone (meta tensors) give the preset's config and the keys, as a checkpoint loader needs them.
    assert original_dit_config(original) == model.config
    assert original_dit_to_diffusers(original).keys() == model.state_dict().keys()


@torch.no_grad()
def test_backend_is_passed_to_every_kernel_call():
    model = DiT(**SMALL)
    sample, timestep, labels = inputs()
    users = [m for m in model.modules() if hasattr(m, "backend")]
    assert {type(m).__name__ for m in users} == {"DiT", "DiTBlock", "Attention", "GELU", "Conv2d", "Linear"}
    # the patch embedding's Conv2d and the Linears call no kernel op: their backend only picks a packed path on
    # "auto" (test_conv, test_linear)
    for module in [m for m in users if type(m).__name__ not in ("Conv2d", "Linear")]:
        module.backend = "no-such-backend"
        with pytest.raises(ValueError, match="no backend 'no-such-backend'"):
            model(sample, timestep, labels)
        module.backend = "ref"
    model(sample, timestep, labels)


@torch.no_grad()
def test_half_precision_follows_input_dtype():
    ref = reference({**SMALL, "out_channels": 8})
    model = ours_from(ref)
    sample, timestep, labels = inputs()
    expected = model(sample, timestep, labels)
    output = model.to(torch.bfloat16)(sample.bfloat16(), timestep, labels)
    assert output.dtype == torch.bfloat16
    assert_close(output.float(), expected, rtol=3e-2)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_stream_is_contiguous(dtype):
    # A transposed token layout from the patch embedding would carry through every residual add (strided kernels)
    # and make each fused adaLN call copy its input first: a speed defect no output comparison sees.
    model = DiT(**SMALL).to(dtype)
    seen = []
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    sample, timestep, labels = inputs()
    model(sample.to(dtype), timestep, labels)
    assert seen == [True] * SMALL["num_layers"]
