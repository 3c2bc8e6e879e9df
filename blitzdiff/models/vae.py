"""The decoder half of diffusers' AutoencoderKL (Rombach et al. 2022): latents -> images.

Source: diffusers 0.42 `models/autoencoders/autoencoder_kl.py` (post_quant_conv, decode) and
`models/autoencoders/vae.py` (Decoder). State-dict keys are diffusers' `decoder.*` and `post_quant_conv.*`; a full
AutoencoderKL checkpoint also holds the encoder, whose keys start with ENCODER_PREFIXES and are dropped on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar

from torch import Tensor, nn

from .conv import Conv2d
from .layers import MidBlock, ResnetBlock2D, UpBlock, norm, require, resolve_config, spatial_attention

# diffusers' AutoencoderKL.__init__ defaults (a test checks them against the installed diffusers).
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
})
# Accepted and kept in `config` but without effect on decoding: the encoder's fields (in_channels,
# down_block_types, use_quant_conv), the tiling tile size (sample_size) and force_upcast (a hint to run the VAE in
# float32 when the rest is float16; the caller's precision choice, not part of the math).
IGNORED_FIELDS = ("in_channels", "down_block_types", "use_quant_conv", "sample_size", "force_upcast")
EPS = 1e-6  # diffusers' Decoder fixes every GroupNorm's eps


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    name = "AutoencoderKL"
    cfg = resolve_config(name, config, DEFAULTS)
    require(name, "act_fn", cfg["act_fn"], ("silu", "swish"))
    require(name, "latents_mean", cfg["latents_mean"], (None,))  # SDXL-style per-channel normalization: not here
    require(name, "latents_std", cfg["latents_std"], (None,))
    for block_type in cfg["up_block_types"]:
        require(name, "up_block_types", block_type, ("UpDecoderBlock2D",))
    if len(cfg["up_block_types"]) != len(cfg["block_out_channels"]):
        raise ValueError(f"{name}: up_block_types has {len(cfg['up_block_types'])} entries; block_out_channels has "
                         f"{len(cfg['block_out_channels'])}")
    return cfg


class Decoder(nn.Module):
    """conv_in, a mid block (resnet, single-head self-attention, resnet), UpDecoderBlock2D blocks of
    layers_per_block + 1 resnets with 2x upsampling between them, GroupNorm + SiLU, conv_out."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        ch, groups, count = list(cfg["block_out_channels"]), cfg["norm_num_groups"], cfg["layers_per_block"] + 1
        rev = ch[::-1]
        resnet = partial(ResnetBlock2D, temb_channels=None, groups=groups, eps=EPS)
        attention = (lambda c, _: spatial_attention(c, head_dim=c, norm_num_groups=groups, eps=EPS)) \
            if cfg["mid_block_add_attention"] else None
        self.conv_in = Conv2d(cfg["latent_channels"], ch[-1], 3, padding=1)
        self.mid_block = MidBlock(ch[-1], 1, resnet=resnet, attention=attention)
        self.up_blocks = nn.ModuleList(
            UpBlock([rev[max(i - 1, 0)]] + [rev[i]] * (count - 1), rev[i], resnet=resnet, attention=None,
                    upsample=i < len(ch) - 1) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], EPS)
        self.conv_out = Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        self.backend = "ref"

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z), None, None)  # [B, ch[-1], h, w]
        for block in self.up_blocks:
            h = block(h, None, None)  # [B, ch[i], 2h, 2w] (the last block keeps its size)
        return self.conv_out(norm(self.conv_norm_out, h, self.backend, silu=True))  # [B, out, H, W]


class AutoencoderKLDecoder(nn.Module):
    """decode(latents) -> images: latents / scaling_factor + shift_factor (what diffusers' pipelines apply before
    `vae.decode`), post_quant_conv (when use_post_quant_conv), then the decoder. forward = decode."""

    diffusers_class: ClassVar[str] = "AutoencoderKL"
    # State-dict prefixes of the encoder half: a full AutoencoderKL checkpoint's keys minus these load strictly.
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("encoder.", "quant_conv.")

    def __init__(self, config: Mapping[str, Any] = DEFAULTS):
        super().__init__()
        cfg = _resolve(config)
        latent = cfg["latent_channels"]
        self.post_quant_conv = Conv2d(latent, latent, 1) if cfg["use_post_quant_conv"] else None
        self.decoder = Decoder(cfg)
        self.config = cfg

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AutoencoderKLDecoder:
        return cls(config)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, latent_channels, h, w] as the sampler produces them -> images [B, out, 2^k h, 2^k w]
        (about [-1, 1])."""
        z = latents / self.config["scaling_factor"]
        if self.config["shift_factor"] is not None:
            z = z + self.config["shift_factor"]
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, latents: Tensor) -> Tensor:
        return self.decode(latents)
