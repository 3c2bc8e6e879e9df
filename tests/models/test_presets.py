"""Random-weight presets: published configs and parameter counts (on the meta device), the scaled init keeping
activations O(1) through the real depth of each family (narrow variants on CPU), determinism, errors."""

import pytest
import torch
from torch import nn

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.pipeline import Pipeline
from blitzdiff.models import PRESETS, build_preset, init_random_weights
from blitzdiff.models.presets import build_random
from blitzdiff.models.registry import class_name

# diffusers' layout: 859,520,964 is SD 1.5's published UNet size. DiT-XL/2 holds 28 copies of the embedders in
# diffusers' layout; the paper's 675,129,632 is the original layout (one copy and a 256-token pos_embed parameter).
PARAMETERS = {"sd15-unet": 859_520_964, "dit-xl-2-256": 749_826_464, "dit-xl-2-512": 749_826_464}
DIT_XL_2_PAPER = 675_129_632
# The full architectures narrowed (same depth, blocks and attention layout; fewer channels), so a CPU forward is fast:
# SD 1.5 with 32..64 channels (8 heads of 4-8 dims, the real 768-wide context); DiT-XL/2's 28 blocks at width 64.
NARROW = {
    "sd15-unet": {**PRESETS["sd15-unet"].model_config, "block_out_channels": (32, 64, 64, 64)},
    "dit-xl-2-256": {**PRESETS["dit-xl-2-256"].model_config, "num_attention_heads": 4, "attention_head_dim": 16,
                     "sample_size": 8},
}


def narrow(name, **options):
    return build_random(PRESETS[name].model_class, NARROW[name], **options)


def forward(name, model, batch=2, seed=1):
    """One float32 network evaluation at a mid-range timestep with unit-variance latents and conditioning."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config["sample_size"]
    sample = torch.randn(batch, 4, size if name.startswith("dit") else 16, size if name.startswith("dit") else 16,
                         generator=gen)
    t = torch.tensor([500.0] * batch)
    with torch.no_grad():
        if name.startswith("dit"):
            return model(sample, t, torch.arange(batch) * 7)  # labels 0, 7, ...
        return model(sample, t, encoder_hidden_states=torch.randn(batch, 77, 768, generator=gen))


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_counts_on_meta_equal_the_published_ones(name):
    model, scheduler_config = build_preset(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    if name.startswith("dit"):
        embedders = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
        paper = PARAMETERS[name] - 27 * embedders + 256 * 1152  # one embedder copy, the 256-token pos_embed at 256
        assert paper == DIT_XL_2_PAPER


@pytest.mark.parametrize("name", PRESETS)
def test_configs_build_the_same_network_in_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    preset = PRESETS[name]
    assert class_name(preset.model_config["_class_name"]) == preset.model_class  # DiT: legacy Transformer2DModel
    with torch.device("meta"):
        theirs = getattr(diffusers, preset.model_config["_class_name"]).from_config(dict(preset.model_config))
    assert type(theirs).__name__ == preset.model_class
    assert sum(p.numel() for p in theirs.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("name, kind, latent", [
    ("sd15-unet", "text", (4, 64, 64)), ("dit-xl-2-256", "class", (4, 32, 32)), ("dit-xl-2-512", "class", (4, 64, 64)),
])
def test_presets_make_pipelines_with_the_published_schedules(name, kind, latent):
    pipe = blitzdiff.load(name, device="meta")  # load() knows the preset names
    assert isinstance(pipe, Pipeline) and pipe.name == name and pipe.vae is None
    assert pipe.sampler_name == "ddim"  # sampling needs no sampler= argument
    assert pipe.latent_shape(None, None) == latent
    assert (pipe.kind.text_conditional, pipe.kind.class_conditional) == (kind == "text", kind == "class")
    scheduler = resolve(None, pipe.scheduler_config)
    assert (scheduler.num_train_timesteps, scheduler.clip_sample, scheduler.prediction_type) == (1000, False, "epsilon")
    if name == "sd15-unet":  # PNDM's published betas and timesteps, run by DDIM
        assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
        assert (scheduler.steps_offset, scheduler.set_alpha_to_one) == (1, False)
    else:
        assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("linear", 0.0001, 0.02)
        assert (pipe.kind.null_class, pipe.num_classes) == (1000, 1000)


@pytest.mark.parametrize("name", NARROW)
def test_init_keeps_activations_order_one_through_the_full_depth(name):
    model = narrow(name)
    peaks = []

    def record_peak(_module, _inputs, out):
        if torch.is_tensor(out):
            peaks.append(out.abs().max().item())

    for module in model.modules():
        module.register_forward_hook(record_peak)
    out = forward(name, model)
    assert torch.isfinite(out).all()
    assert 0.1 < out.std() < 10
    assert max(peaks) < 1e3  # every intermediate far below float16's 65504
    # Non-degenerate: the conditioning reaches the output (DiT's adaLN gates are not zero), and each sample differs.
    assert not torch.allclose(out[0], out[1])
    if name.startswith("dit"):
        relabelled = model(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor([3]))
        assert not torch.allclose(relabelled, model(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor([4])))


def test_same_seed_same_weights_other_seed_other_weights_any_dtype():
    first, again = narrow("dit-xl-2-256", seed=3).state_dict(), narrow("dit-xl-2-256", seed=3).state_dict()
    other = narrow("dit-xl-2-256", seed=4).state_dict()
    half = narrow("dit-xl-2-256", seed=3, dtype="bfloat16").state_dict()
    random = [key for key in first if key.endswith("weight")]  # biases are zeros, so equal for every seed
    assert len(random) == 28 * 10 + 3  # per block: 2 timestep MLP, label table, adaLN, q, k, v, out, 2 MLP
    for key in first:
        assert torch.equal(first[key], again[key]), key
        assert half[key].dtype == torch.bfloat16 and torch.equal(half[key], first[key].to(torch.bfloat16)), key
    for key in random:
        assert not torch.equal(first[key], other[key]), key


def test_init_rules():
    model = init_random_weights(nn.Sequential(nn.Conv2d(64, 256, 3), nn.GroupNorm(32, 256), nn.Linear(512, 1024),
                                              nn.LayerNorm(8), nn.Embedding(1000, 256)), seed=0)
    conv, group_norm, linear, layer_norm, embedding = model
    assert conv.weight.std().item() == pytest.approx((64 * 9) ** -0.5, rel=0.02)
    assert linear.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.02)
    assert embedding.weight.std().item() == pytest.approx(1.0, rel=0.02)
    for mean in (conv.weight, linear.weight, embedding.weight):
        assert abs(mean.mean().item()) < 0.01
    assert not conv.bias.any() and not linear.bias.any()
    for norm in (group_norm, layer_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    with pytest.raises(ValueError, match=r"no rule .*\(BatchNorm1d\)"):
        init_random_weights(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_narrow_dit_samples_through_the_pipeline():
    pipe = Pipeline(narrow("dit-xl-2-256"), PRESETS["dit-xl-2-256"].scheduler_config, None, name="narrow")
    raw = pipe.sample(2, steps=3, seeds=0, class_labels=[1, 2], output_type="raw", progress=False)
    assert raw.shape == (2, 4, 8, 8) and torch.isfinite(raw).all()


def test_errors():
    with pytest.raises(ValueError, match="unknown preset 'sd14'.*sd15-unet, dit-xl-2-256, dit-xl-2-512"):
        build_preset("sd14")
    with pytest.raises(ValueError, match="seed must be an int"):
        build_preset("dit-xl-2-256", device="meta", seed=1.5)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        build_preset("dit-xl-2-256", device="meta", dtype="int8")
