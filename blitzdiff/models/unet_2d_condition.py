"""diffusers' UNet2DConditionModel as Stable Diffusion 1.x / 2.x use it (Rombach et al. 2022): the UNet body of
unet_2d.py with spatial transformers (self-attention, cross-attention on the text context, GEGLU MLP).

Source: diffusers 0.42 `models/unets/unet_2d_condition.py`. Module names equal diffusers' state-dict keys.
Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn / UNetMidBlock2D / no mid block,
CrossAttnUpBlock2D / UpBlock2D; per-block attention heads, cross-attention widths, layers and transformer depths;
conv or linear projections; class embeddings of types None (label table), "timestep" and "identity". Refused with a
ValueError: SDXL-style added embeddings, encoder projections, time-conditioning projections (LCM), GLIGEN, dual or
only-cross attention, "fourier" time embeddings and activations other than SiLU.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from torch import Tensor

from .layers import (
    CLASS_EMBED_TYPES,
    AttentionFactory,
    Timesteps,
    Transformer2DModel,
    per_block,
    require,
    resolve_config,
    timestep_batch,
)
from .unet_2d import ACTIVATIONS, RESNET_TIME_SCALE_SHIFTS, UNetBody, check_blocks

# diffusers' UNet2DConditionModel.__init__ defaults (a test checks them against the installed diffusers).
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
})
# Accepted and kept in `config` but without effect on inference here: the training resolution, dropout,
# upcast_attention (diffusers' default SDPA processor ignores it; float32 math is unaffected), and fields that only
# the refused block / embedding types read (Simple* and ResnetDownsample blocks: resnet_skip_time_act,
# resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention; added embeddings and projection
# class embeddings: addition_time_embed_dim, addition_embed_type_num_heads, projection_class_embeddings_input_dim).
IGNORED_FIELDS = (
    "sample_size", "dropout", "upcast_attention", "resnet_skip_time_act", "resnet_out_scale_factor",
    "cross_attention_norm", "mid_block_only_cross_attention", "addition_time_embed_dim",
    "addition_embed_type_num_heads", "projection_class_embeddings_input_dim",
)
# Fields whose only supported value is diffusers' default (anything else changes the math in ways not implemented).
_DEFAULT_ONLY = (
    "encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads", "dual_cross_attention", "addition_embed_type",
    "time_embedding_type", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "attention_type",
    "class_embeddings_concat",
)


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    name = "UNet2DConditionModel"
    cfg = resolve_config(name, config, DEFAULTS)
    for field in _DEFAULT_ONLY:
        require(name, field, cfg[field], (DEFAULTS[field],))
    require(name, "act_fn", cfg["act_fn"], ACTIVATIONS)
    require(name, "resnet_time_scale_shift", cfg["resnet_time_scale_shift"], RESNET_TIME_SCALE_SHIFTS)
    require(name, "class_embed_type", cfg["class_embed_type"], CLASS_EMBED_TYPES)
    require(name, "mid_block_type", cfg["mid_block_type"], ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None))
    check_blocks(name, cfg, ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
    n = len(cfg["block_out_channels"])
    for flag in per_block(name, "only_cross_attention", cfg["only_cross_attention"], n):
        require(name, "only_cross_attention", flag, (False,))
    tl = cfg["transformer_layers_per_block"]
    if cfg["reverse_transformer_layers_per_block"] is None and isinstance(tl, (list, tuple)) and any(
            isinstance(v, (list, tuple)) for v in tl):
        raise ValueError(f"{name}: per-layer transformer_layers_per_block {tl!r} needs "
                         "reverse_transformer_layers_per_block (as diffusers requires)")
    return cfg


def _depth(layers: int | list[int], j: int) -> int:
    """A block's transformer depth for layer j: one int for the block or one per layer."""
    return layers[j] if isinstance(layers, (list, tuple)) else layers


class UNet2DConditionModel(UNetBody):
    """diffusers' UNet2DConditionModel: forward(sample, timestep, class_labels, encoder_hidden_states) -> the raw
    prediction (diffusers' `.sample`).

    diffusers' naming confusion is kept: attention_head_dim is the number of heads per block (its
    num_attention_heads must stay None); each head has channels // heads dims.
    """

    diffusers_class: ClassVar[str] = "UNet2DConditionModel"

    def __init__(self, config: Mapping[str, Any] = DEFAULTS):
        name, cfg = "UNet2DConditionModel", _resolve(config)
        ch = list(cfg["block_out_channels"])
        n = len(ch)
        heads = per_block(name, "attention_head_dim", cfg["attention_head_dim"], n)
        cross = per_block(name, "cross_attention_dim", cfg["cross_attention_dim"], n)
        layers = per_block(name, "layers_per_block", cfg["layers_per_block"], n)
        depth = per_block(name, "transformer_layers_per_block", cfg["transformer_layers_per_block"], n)
        up_depth = depth[::-1] if cfg["reverse_transformer_layers_per_block"] is None else per_block(
            name, "reverse_transformer_layers_per_block", cfg["reverse_transformer_layers_per_block"], n)

        def transformer(heads: int, depth: int | list[int], cross: int) -> AttentionFactory:
            return lambda c, j: Transformer2DModel(
                c, heads, c // heads, num_layers=_depth(depth, j), cross_attention_dim=cross,
                norm_num_groups=cfg["norm_num_groups"], use_linear_projection=cfg["use_linear_projection"])

        mid = {"UNetMidBlock2DCrossAttn": (1, transformer(heads[-1], depth[-1], cross[-1])),
               "UNetMidBlock2D": (0, None), None: None}[cfg["mid_block_type"]]
        down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
        super().__init__(
            cfg, time_proj=Timesteps(ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"]), timestep_dim=ch[0],
            layers=layers,
            down_attention=lambda i: transformer(heads[i], depth[i], cross[i])
            if down_types[i] == "CrossAttnDownBlock2D" else None,
            up_attention=lambda i: transformer(heads[n - 1 - i], up_depth[i], cross[n - 1 - i])
            if up_types[i] == "CrossAttnUpBlock2D" else None,
            mid=mid, conv_in_kernel=cfg["conv_in_kernel"], conv_out_kernel=cfg["conv_out_kernel"])
        self.config = cfg

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None) -> Tensor:
        """sample [B, in, H, W] (any H, W: odd sizes upsample to the skip's size, as diffusers); timestep: a number,
        a 0-d or [B] tensor; encoder_hidden_states [B, L, cross_attention_dim] (required)."""
        if encoder_hidden_states is None:
            raise ValueError("UNet2DConditionModel needs encoder_hidden_states [B, L, cross_attention_dim]")
        t = timestep_batch(timestep, sample)  # [B]
        return self.body(sample, self.embed(sample, t, class_labels), encoder_hidden_states)
