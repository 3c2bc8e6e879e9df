"""blitzdiff's AutoencoderKLDecoder against diffusers' AutoencoderKL: the decoder half of a full checkpoint loads
strictly once the encoder's keys are dropped, and decode(latents) equals diffusers' `vae.decode` of the latents
unscaled as its pipelines unscale them, to 1e-5 relative in float32."""

import pytest
import torch
from diffusers import AutoencoderKL

from blitzdiff.models import vae
from blitzdiff.models.vae import AutoencoderKLDecoder
from tests.models.test_unet import (  # single_thread: the autouse fixture, applied to this module too
    BATCH,
    RTOL,
    check_defaults,
    randomized,
    relative_error,
    single_thread,  # noqa: F401
)

CASES = {
    # SD 1.x layout in small; odd latent size.
    "sd1": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, size=(5, 7)),
    # SD3 / Flux style: 16 latent channels, a shift factor, no (post-)quant conv; plus no mid attention.
    "sd3_shift_no_post_quant": dict(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4, latent_channels=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, out_channels=1, size=(4, 3)),
}


def case(name: str, seed: int = 0):
    config = dict(CASES[name])
    height, width = config.pop("size")
    torch.manual_seed(seed)
    reference = randomized(AutoencoderKL(**config), seed)
    latents = torch.randn(BATCH, config.get("latent_channels", 4), height, width)
    return config, reference, latents


def decoder_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.state_dict().items() if not k.startswith(AutoencoderKLDecoder.ENCODER_PREFIXES)}


@pytest.mark.parametrize("name", CASES)
def test_decode_matches_diffusers(name):
    config, reference, latents = case(name)
    ours = AutoencoderKLDecoder.from_config({"_class_name": "AutoencoderKL", **config})
    ours.load_state_dict(decoder_state(reference), strict=True)
    scaling, shift = ours.config["scaling_factor"], ours.config["shift_factor"] or 0.0
    with torch.no_grad():
        ref = reference.decode(latents / scaling + shift).sample  # what diffusers' pipelines do before decoding
        out = ours.decode(latents)
        assert relative_error(out, ref) < RTOL
        assert torch.equal(ours(latents), out)
    assert out.shape[-2:] == (latents.shape[-2] * 2 ** (len(config["block_out_channels"]) - 1),
                              latents.shape[-1] * 2 ** (len(config["block_out_channels"]) - 1))


def test_only_encoder_keys_are_dropped():
    config, reference, _ = case("sd1")
    ours = AutoencoderKLDecoder.from_config(config)
    dropped = set(reference.state_dict()) - set(ours.state_dict())
    assert dropped and all(k.startswith(("encoder.", "quant_conv.")) for k in dropped)
    assert set(ours.state_dict()) <= set(reference.state_dict())


def test_meta_construction_then_assign():
    config, reference, latents = case("sd1")
    with torch.device("meta"):
        ours = AutoencoderKLDecoder.from_config(config)
    assert all(p.is_meta for p in ours.parameters())
    ours.load_state_dict(decoder_state(reference), strict=True, assign=True)
    with torch.no_grad():
        assert relative_error(ours.decode(latents), reference.decode(latents / 0.18215).sample) < RTOL


@pytest.mark.parametrize("field, value", [
    ("latents_mean", [0.0] * 4), ("latents_std", [1.0] * 4), ("act_fn", "gelu"),
    ("up_block_types", ("AttnUpDecoderBlock2D",)), ("up_block_types", ("UpDecoderBlock2D",) * 2),
])
def test_refuses_unsupported_values(field, value):
    with pytest.raises(ValueError, match=field):
        AutoencoderKLDecoder.from_config({field: value})


def test_config_fields_and_defaults():
    check_defaults(vae.DEFAULTS, AutoencoderKL)
    assert set(vae.IGNORED_FIELDS) <= set(vae.DEFAULTS)
    with pytest.raises(ValueError, match="unknown config field.*decoder_block_types"):
        AutoencoderKLDecoder.from_config({"decoder_block_types": ["UpDecoderBlock2D"]})
    # encoder-side fields are accepted and do not change the decoder
    plain = AutoencoderKLDecoder.from_config({k: v for k, v in CASES["sd1"].items() if k != "size"})
    other = AutoencoderKLDecoder.from_config({**plain.config, "in_channels": 1, "use_quant_conv": False,
                                              "down_block_types": ["DownEncoderBlock2D"] * 2, "force_upcast": False,
                                              "sample_size": 512})
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}
