"""blitzdiff's UNet2DModel and UNet2DConditionModel against diffusers': same weights (diffusers' state dict loaded
strictly), same inputs, float32 outputs equal to 1e-5 relative; config validation; meta-device construction."""

import inspect
from collections.abc import Mapping

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel
from diffusers import UNet2DModel as DiffusersUNet2DModel

from blitzdiff.models import layers, unet_2d, unet_2d_condition
from blitzdiff.models.unet_2d import UNet2DModel
from blitzdiff.models.unet_2d_condition import UNet2DConditionModel

RTOL = 1e-5
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one thread is fastest, and on a loaded 2-core CI box intra-op threads spin against
    other processes (a 40 ms forward took seconds). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn, norm scales and biases included, so a misplaced one cannot hide behind 1 or 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def ours_like(cls, config: Mapping, reference: torch.nn.Module) -> torch.nn.Module:
    """Our model from the config, holding the reference's weights (strict: every key, nothing extra)."""
    model = cls.from_config({"_class_name": cls.diffusers_class, "_diffusers_version": "0.42.1", **config})
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def class_labels(config: Mapping) -> torch.Tensor | None:
    """What the config's class embedding reads: labels, or [B, temb] embeddings for "identity"; None without one."""
    if config.get("class_embed_type") == "identity":
        return torch.randn(BATCH, config.get("time_embedding_dim") or 4 * config["block_out_channels"][0])
    if config.get("class_embed_type") == "timestep" or config.get("num_class_embeds") is not None:
        return torch.tensor([3, 7])
    return None


def check_defaults(defaults: Mapping, diffusers_cls: type) -> None:
    """Our table of diffusers' __init__ defaults is the installed diffusers' (lists and tuples alike)."""
    params = inspect.signature(diffusers_cls.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    assert set(theirs) == set(defaults)
    for key, value in theirs.items():
        assert (list(value) if isinstance(value, tuple) else value) == \
            (list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]), key


# --- UNet2DModel ---------------------------------------------------------------------------------------------------

UNET2D_CASES = {
    # ADM-style: AdaGN resnets (the mid attention then has no GroupNorm), class table, mid output rescale.
    "adm_scale_shift_labels": dict(
        block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=16, num_class_embeds=10, resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.41, size=(12, 20)),
    # DDPM-style options: one attention head, padding 0 downsampling, no mid attention, sinusoid order / shift,
    # label embedded like a timestep, centred input, a custom time-embedding width.
    "ddpm_options_timestep_labels": dict(
        block_out_channels=(16, 32), down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=2, norm_num_groups=4, in_channels=1,
        out_channels=2, attention_head_dim=None, class_embed_type="timestep", flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, center_input_sample=True, time_embedding_dim=48, norm_eps=1e-6, add_attention=False,
        size=(10, 6)),
    # NCSN++-style Gaussian Fourier features of sigma (output divided by sigma), caller-embedded labels, no mid.
    "fourier_identity_no_mid": dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        time_embedding_type="fourier", class_embed_type="identity", mid_block_type=None, size=(8, 12)),
    "scale_shift_attn_groups": dict(
        block_out_channels=(16, 32), down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2, size=(6, 10)),
}
# A number (UNet2DModel casts it to long: 417.7 runs as 417 in both), a 0-d tensor, one per sample.
UNET2D_TIMESTEPS = {"int": 500, "float": 417.7, "0d": torch.tensor(500), "batch": torch.tensor([10, 980])}
FOURIER_TIMESTEPS = {"int": 3, "0d": torch.tensor(0.7), "batch": torch.tensor([0.02, 40.0])}  # sigmas


def build_case(diffusers_cls: type, case: Mapping, in_channels: int, seed: int = 0):
    """(config, randomized diffusers model, sample [B, C, H, W], class labels) of a case; "size" is (H, W)."""
    config = dict(case)
    height, width = config.pop("size")
    torch.manual_seed(seed)
    reference = randomized(diffusers_cls(**config), seed)
    sample = torch.randn(BATCH, config.get("in_channels", in_channels), height, width)
    return config, reference, sample, class_labels(config)


def unet2d_case(name: str):
    return build_case(DiffusersUNet2DModel, UNET2D_CASES[name], 3)


@pytest.mark.parametrize("name", UNET2D_CASES)
def test_unet2d_matches_diffusers(name):
    config, reference, sample, labels = unet2d_case(name)
    ours = ours_like(UNet2DModel, config, reference)
    timesteps = FOURIER_TIMESTEPS if config.get("time_embedding_type") == "fourier" else UNET2D_TIMESTEPS
    with torch.no_grad():
        for form, t in timesteps.items():
            ref = reference(sample, t, class_labels=labels).sample
            out = ours(sample, t, class_labels=labels)
            assert relative_error(out, ref) < RTOL, form
        # the samples of a batch differ, so a broadcasting mistake cannot pass unseen
        assert not torch.allclose(out[0], out[1])


def test_unet2d_conditioning_errors():
    config, reference, sample, labels = unet2d_case("adm_scale_shift_labels")
    ours = ours_like(UNet2DModel, config, reference)
    with pytest.raises(ValueError, match="class_labels are required"):
        ours(sample, 10)
    with pytest.raises(ValueError, match="encoder_hidden_states must be None"):
        ours(sample, 10, labels, torch.randn(BATCH, 3, 8))
    with pytest.raises(ValueError, match="one per sample"):
        ours(sample, torch.tensor([1, 2, 3]), labels)
    plain = UNet2DModel.from_config({k: v for k, v in config.items() if k != "num_class_embeds"})
    with pytest.raises(ValueError, match="class_labels must be None"):
        plain(sample, 10, labels)


@pytest.mark.parametrize("field, value", [
    ("time_embedding_type", "learned"), ("act_fn", "gelu"), ("downsample_type", "resnet"),
    ("upsample_type", "resnet"), ("class_embed_type", "projection"), ("resnet_time_scale_shift", "spatial"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("norm_num_groups", None), ("layers_per_block", [2, 2, 2, 2]),
    ("down_block_types", ("SkipDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")),
    ("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnSkipUpBlock2D")),
    ("block_out_channels", (32, 64)),
])
def test_unet2d_refuses_unsupported_values(field, value):
    with pytest.raises(ValueError, match=field):
        UNet2DModel.from_config({field: value})


def test_unet2d_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown config field.*resnet_num_groups"):
        UNet2DModel.from_config({"resnet_num_groups": 32})


def test_unet2d_config_and_defaults():
    check_defaults(unet_2d.DEFAULTS, DiffusersUNet2DModel)
    assert set(unet_2d.IGNORED_FIELDS) <= set(unet_2d.DEFAULTS)
    config = dict(UNET2D_CASES["adm_scale_shift_labels"])
    config.pop("size")
    model = UNet2DModel.from_config(config)
    assert model.config == {**unet_2d.DEFAULTS, **config}
    rebuilt = UNet2DModel.from_config(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_backend_reaches_the_kernels():
    config, reference, sample, labels = unet2d_case("adm_scale_shift_labels")
    ours = ours_like(UNet2DModel, config, reference)
    holders = [m for m in ours.modules() if hasattr(m, "backend")]
    assert {type(m).__name__ for m in holders} >= {"UNet2DModel", "ResnetBlock2D", "Attention", "Timesteps"}
    for module in holders:
        module.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no backend 'no-such-backend'"):
        ours(sample, 10, labels)


@pytest.mark.parametrize("linear", [False, True])
def test_blocks_match_diffusers_where_eps_matters(linear):
    """Block by block on inputs of variance ~1e-6, where a GroupNorm eps of 1e-6 vs 1e-5 shows (end to end it hides
    below the tolerance): the spatial transformer's fixed eps and the resnet's configured one."""
    from diffusers.models.resnet import ResnetBlock2D as TheirResnet
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as TheirTransformer

    torch.manual_seed(0)
    x, context, temb = 1e-3 * torch.randn(BATCH, 16, 5, 3), torch.randn(BATCH, 6, 12), torch.randn(BATCH, 20)
    theirs = randomized(TheirTransformer(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                         cross_attention_dim=12, norm_num_groups=4, use_linear_projection=linear), 1)
    ours = layers.Transformer2DModel(16, 2, 8, num_layers=1, cross_attention_dim=12, norm_num_groups=4,
                                     use_linear_projection=linear)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs_resnet = randomized(TheirResnet(in_channels=16, out_channels=8, temb_channels=20, groups=4, eps=1e-6,
                                           time_embedding_norm="scale_shift"), 2)
    ours_resnet = layers.ResnetBlock2D(16, 8, temb_channels=20, groups=4, eps=1e-6, time_embedding_norm="scale_shift")
    ours_resnet.load_state_dict(theirs_resnet.state_dict(), strict=True)
    with torch.no_grad():
        ref = theirs(x, encoder_hidden_states=context, return_dict=False)[0]
        assert relative_error(ours(x, context), ref) < RTOL
        # the resnet receives SiLU(temb): the UNet applies it once for all blocks
        assert relative_error(ours_resnet(x, torch.nn.functional.silu(temb)), theirs_resnet(x, temb)) < RTOL


# --- UNet2DConditionModel ------------------------------------------------------------------------------------------

COND_CASES = {
    # SD 1.x layout in small: conv projections, two transformer layers per block; odd latent size.
    "sd1_conv_projection": dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
        attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=2, size=(9, 13)),
    # SD 2.x options: linear projections, per-block heads / layers / depths / cross widths, AdaGN resnets, class
    # table, other conv_in / conv_out kernels, centred input, custom time-embedding width.
    "sd2_linear_per_block": dict(
        block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                           "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=[1, 2, 1],
        attention_head_dim=[2, 4, 8], cross_attention_dim=[24, 24, 24], use_linear_projection=True,
        transformer_layers_per_block=[1, 2, 1], resnet_time_scale_shift="scale_shift", num_class_embeds=8,
        conv_in_kernel=1, conv_out_kernel=5, center_input_sample=True, upcast_attention=True, time_embedding_dim=40,
        norm_num_groups=8, in_channels=3, out_channels=5, size=(11, 7)),
    # Plain mid block, labels embedded like timesteps, asymmetric per-layer transformer depths.
    "plain_mid_asymmetric": dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4, mid_block_type="UNetMidBlock2D", class_embed_type="timestep",
        transformer_layers_per_block=[1, [2]], reverse_transformer_layers_per_block=[[1, 2], 1],
        flip_sin_to_cos=False, freq_shift=1, size=(8, 8)),
}
# float: diffusers keeps a Python float as float64 here
COND_TIMESTEPS = {"int": 500, "float": 417.7, "0d": torch.tensor(500.5), "batch": torch.tensor([10, 980])}


def cond_case(name: str):
    config, reference, sample, labels = build_case(DiffusersUNet2DConditionModel, COND_CASES[name], 4)
    cross = config["cross_attention_dim"]
    context = torch.randn(BATCH, 7, cross[0] if isinstance(cross, list) else cross)  # [B, L, cross]
    return config, reference, sample, context, labels


@pytest.mark.parametrize("name", COND_CASES)
def test_unet2d_condition_matches_diffusers(name):
    config, reference, sample, context, labels = cond_case(name)
    ours = ours_like(UNet2DConditionModel, config, reference)
    with torch.no_grad():
        for form, t in COND_TIMESTEPS.items():
            ref = reference(sample, t, context, class_labels=labels).sample
            out = ours(sample, t, class_labels=labels, encoder_hidden_states=context)
            assert relative_error(out, ref) < RTOL, form
        assert not torch.allclose(out[0], out[1])


def test_unet2d_condition_on_meta_then_assigned():
    """gpt-fast style: build on the meta device (no memory, no init), then take the checkpoint's tensors."""
    config, reference, sample, context, labels = cond_case("sd1_conv_projection")
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(config)
    assert all(p.is_meta for p in ours.parameters())
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    with torch.no_grad():
        assert relative_error(ours(sample, 10, encoder_hidden_states=context), reference(sample, 10, context).sample) \
            < RTOL


SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_sd15_builds_on_meta_with_diffusers_shapes():
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(SD15)
        theirs = DiffusersUNet2DConditionModel(**{k: v for k, v in SD15.items() if not k.startswith("_")})
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("field, value", [
    ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 256), ("encoder_hid_dim", 768),
    ("encoder_hid_dim_type", "text_proj"), ("num_attention_heads", 8), ("dual_cross_attention", True),
    ("only_cross_attention", True), ("only_cross_attention", [False, True, False, False]),
    ("attention_type", "gated"), ("class_embed_type", "projection"), ("time_embedding_type", "fourier"),
    ("time_embedding_act_fn", "silu"), ("timestep_post_act", "silu"), ("class_embeddings_concat", True),
    ("act_fn", "mish"), ("resnet_time_scale_shift", "ada_group"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D",) * 4), ("up_block_types", ("KUpBlock2D",) * 4),
    ("attention_head_dim", [8, 8]), ("cross_attention_dim", [768, 768, 768]), ("layers_per_block", [2, 2]),
    ("transformer_layers_per_block", [[1, 2], 1, 1, 1]),
])
def test_unet2d_condition_refuses_unsupported_values(field, value):
    with pytest.raises(ValueError, match=field):
        UNet2DConditionModel.from_config({**SD15, field: value})


def test_unet2d_condition_config_errors_and_defaults():
    check_defaults(unet_2d_condition.DEFAULTS, DiffusersUNet2DConditionModel)
    assert set(unet_2d_condition.IGNORED_FIELDS) <= set(unet_2d_condition.DEFAULTS)
    with pytest.raises(ValueError, match="unknown config field.*addition_embed_dim"):
        UNet2DConditionModel.from_config({**SD15, "addition_embed_dim": 1})
    config, reference, sample, context, labels = cond_case("sd1_conv_projection")
    ours = ours_like(UNet2DConditionModel, config, reference)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        ours(sample, 10)
