"""diffusers' UNet2DModel (DDPM, Ho et al. 2020; ADM's class-conditional variant, Dhariwal & Nichol 2021) and
`UNetBody`, the skeleton it shares with UNet2DConditionModel.

Source: diffusers 0.42 `models/unets/unet_2d.py` and the blocks it builds (`unet_2d_blocks.py`). Module names equal
diffusers' state-dict keys. Supported: down blocks DownBlock2D / AttnDownBlock2D, mid UNetMidBlock2D (or none), up
blocks UpBlock2D / AttnUpBlock2D, "positional" or "fourier" time embeddings, class embeddings (a label table,
"timestep", "identity"), "default" or "scale_shift" (AdaGN) resnets. Refused with a ValueError: other block types,
the "learned" time embedding, "resnet" down / up sampling, activations other than SiLU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import Conv2d
from .layers import (
    CLASS_EMBED_TYPES,
    AttentionFactory,
    DownBlock,
    GaussianFourierProjection,
    MidBlock,
    ProjectedTime,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    UpBlock,
    class_embedding,
    norm,
    require,
    resolve_config,
    spatial_attention,
    timestep_batch,
)
from .linear import DirectLinear
from .packing import PackedParameters, PackingOwner, eager_inference, packed_linear

# diffusers' UNet2DModel.__init__ defaults (a test checks them against the installed diffusers).
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
})
# Accepted and kept in `config` but without effect on inference: the training resolution, the dropout rate, and the
# table size of the (refused) "learned" time embedding.
IGNORED_FIELDS = ("sample_size", "dropout", "num_train_timesteps")

ACTIVATIONS = ("silu", "swish")  # diffusers' get_activation maps both to SiLU
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")


def check_blocks(cls_name: str, cfg: Mapping[str, Any], down: Sequence[str], up: Sequence[str]) -> None:
    """Block types from the supported sets, one down and one up block per entry of block_out_channels."""
    n = len(cfg["block_out_channels"])
    for field, allowed in (("down_block_types", down), ("up_block_types", up)):
        for block_type in cfg[field]:
            require(cls_name, field, block_type, allowed)
        if len(cfg[field]) != n:
            raise ValueError(f"{cls_name}: {field} has {len(cfg[field])} entries; block_out_channels has {n}")
    if not isinstance(cfg["norm_num_groups"], int):
        raise ValueError(f"{cls_name}: norm_num_groups={cfg['norm_num_groups']!r} is not supported; an int is needed")


_Body = TypeVar("_Body", bound="UNetBody")


def _up_block_inputs(rev: Sequence[int], i: int, count: int) -> list[int]:
    """Input widths of up block i's `count` resnets (rev: block_out_channels reversed): the features (the block
    below's width for the first resnet, then rev[i]) plus the skip each concatenates (rev[i]; the last resnet takes
    the skip the down path's previous level left before downsampling into this one, rev[i + 1])."""
    below, last_skip = rev[max(i - 1, 0)], rev[min(i + 1, len(rev) - 1)]
    return [(below if j == 0 else rev[i]) + (last_skip if j == count - 1 else rev[i]) for j in range(count)]


class UNetBody(PackingOwner, nn.Module):
    """What UNet2DModel and UNet2DConditionModel share: time / class embedding, conv_in, down / mid / up blocks,
    conv_norm_out + SiLU, conv_out, wired as diffusers' forward wires them.

    layers: resnets per down block (up blocks have one more); down_attention(i) / up_attention(i): the attention
    factory of down / up block i, or None for a plain block; mid: (attention layers, attention factory) of the mid
    block, or None for no mid block.
    """

    config: dict[str, Any]
    PACKED = ("_packed_time",)
    _packed_time: PackedParameters | None = None  # the resnets' time_emb_proj layers (pack_conditioning)
    _packed_time_direct: DirectLinear | None = None  # its blocked copy for models.linear's kernel

    def __init__(self, cfg: Mapping[str, Any], *, time_proj: nn.Module, timestep_dim: int, layers: Sequence[int],
                 down_attention: Callable[[int], AttentionFactory | None],
                 up_attention: Callable[[int], AttentionFactory | None],
                 mid: tuple[int, AttentionFactory | None] | None, conv_in_kernel: int = 3, conv_out_kernel: int = 3):
        super().__init__()
        ch = list(cfg["block_out_channels"])
        n, temb_dim = len(ch), cfg["time_embedding_dim"] or 4 * ch[0]
        self.conv_in = Conv2d(cfg["in_channels"], ch[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        self.time_proj = time_proj
        self.time_embedding = TimestepEmbedding(timestep_dim, temb_dim)
        self.class_embedding = class_embedding(cfg["class_embed_type"], cfg["num_class_embeds"], timestep_dim,
                                               temb_dim)
        resnet = partial(ResnetBlock2D, temb_channels=temb_dim, groups=cfg["norm_num_groups"], eps=cfg["norm_eps"],
                         time_embedding_norm=cfg["resnet_time_scale_shift"])
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], layers[i], resnet=resnet, attention=down_attention(i),
                      downsample_padding=cfg["downsample_padding"] if i < n - 1 else None) for i in range(n))
        self.mid_block = None if mid is None else MidBlock(
            ch[-1], mid[0], resnet=partial(resnet, output_scale_factor=cfg["mid_block_scale_factor"]),
            attention=mid[1])
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(_up_block_inputs(rev, i, layers[n - 1 - i] + 1), rev[i], resnet=resnet,
                    attention=up_attention(i), upsample=i < n - 1) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], cfg["norm_eps"])
        self.conv_out = Conv2d(ch[0], cfg["out_channels"], conv_out_kernel, padding=(conv_out_kernel - 1) // 2)
        self.backend = "ref"

    @classmethod
    def from_config(cls: type[_Body], config: Mapping[str, Any]) -> _Body:
        """The model for a diffusers config.json dict (defaults filled; unknown or unsupported fields refused)."""
        return cls(config)

    def embed(self, sample: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """[B] timesteps (and class labels) -> the time embedding [B, temb]."""
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # [B, temb]
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(f"{type(self).__name__} has no class embedding (num_class_embeds and class_embed_type "
                                 "are None); class_labels must be None")
            return emb
        if class_labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: class_labels are required")
        if self.config["class_embed_type"] == "timestep":
            class_labels = self.time_proj(class_labels).to(sample.dtype)  # [B, timestep_dim]
        return emb + self.class_embedding(class_labels).to(emb.dtype)

    def body(self, sample: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        """sample [B, in, H, W], time embedding [B, temb], context [B, L, C] or None -> [B, out, H, W]."""
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        temb = self._time_projections(F.silu(emb))  # every resnet projects SiLU(emb)
        h = self.conv_in(sample)  # [B, ch0, H, W]
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            # upsample to the next skip's size: 2x, or the odd size the down path rounded up from
            h = block(h, temb, context, block_skips, skips[-1].shape[-2:] if skips else None)
        h = norm(self.conv_norm_out, h, self.backend, silu=True)  # [B, ch0, H, W]
        return self.conv_out(h)

    def pack_conditioning(self) -> None:
        """Pack every resnet's time_emb_proj (models.packing) so that eager inference projects SiLU(emb) for all of
        them by one GEMM (ProjectedTime) instead of one small GEMM per resnet (11 in unet-digits)."""
        resnets = tuple(m for m in self.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None)
        if not resnets:
            return
        packed = PackedParameters([r.time_emb_proj for r in resnets], ("weight", "bias"))
        start = 0
        for resnet in resnets:
            width = resnet.time_emb_proj.out_features
            resnet.projection_columns = slice(start, start + width)
            start += width
        self._packed_time = packed
        self._packed_time_direct = DirectLinear()

    def _time_projections(self, temb: Tensor) -> Tensor | ProjectedTime:
        """temb [B, temb] itself, or every resnet's projection of it by one GEMM where packed and eager."""
        if self._packed_time is not None and eager_inference(temb) and (tensors := self.packed_buffers("_packed_time")):
            # [B, sum of the projection widths]
            return ProjectedTime(packed_linear(temb, tensors, self._packed_time_direct, self.backend))
        return temb


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    name = "UNet2DModel"
    cfg = resolve_config(name, config, DEFAULTS)
    require(name, "time_embedding_type", cfg["time_embedding_type"], ("positional", "fourier"))
    require(name, "act_fn", cfg["act_fn"], ACTIVATIONS)
    require(name, "resnet_time_scale_shift", cfg["resnet_time_scale_shift"], RESNET_TIME_SCALE_SHIFTS)
    require(name, "downsample_type", cfg["downsample_type"], ("conv",))
    require(name, "upsample_type", cfg["upsample_type"], ("conv",))
    require(name, "class_embed_type", cfg["class_embed_type"], CLASS_EMBED_TYPES)
    require(name, "mid_block_type", cfg["mid_block_type"], ("UNetMidBlock2D", None))
    check_blocks(name, cfg, ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D"))
    if not isinstance(cfg["layers_per_block"], int):
        raise ValueError(f"{name}: layers_per_block={cfg['layers_per_block']!r} is not supported; an int is needed")
    return cfg


class UNet2DModel(UNetBody):
    """diffusers' UNet2DModel: forward(sample, timestep, class_labels) -> the raw prediction (diffusers' `.sample`).

    Attention blocks are self-attention over the feature map with heads = channels // attention_head_dim
    (attention_head_dim None: one head). Under "fourier" the output is divided by the timestep (sigma), as diffusers.
    """

    diffusers_class: ClassVar[str] = "UNet2DModel"

    def __init__(self, config: Mapping[str, Any] = DEFAULTS):
        cfg = _resolve(config)
        ch, eps, groups = list(cfg["block_out_channels"]), cfg["norm_eps"], cfg["norm_num_groups"]
        if cfg["time_embedding_type"] == "fourier":
            time_proj, timestep_dim = GaussianFourierProjection(ch[0]), 2 * ch[0]
        else:
            time_proj, timestep_dim = Timesteps(ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"]), ch[0]

        def attention(groups: int | None, rescale: float) -> AttentionFactory:
            return lambda c, _: spatial_attention(c, head_dim=cfg["attention_head_dim"] or c, norm_num_groups=groups,
                                                  eps=eps, rescale_output_factor=rescale)

        # The mid attention's GroupNorm: attn_norm_num_groups, else norm_num_groups under "default" and none under
        # "scale_shift" (diffusers' UNetMidBlock2D rule).
        mid_groups = cfg["attn_norm_num_groups"] or (groups if cfg["resnet_time_scale_shift"] == "default" else None)
        mid_attention = attention(mid_groups, cfg["mid_block_scale_factor"]) if cfg["add_attention"] else None
        down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
        super().__init__(
            cfg, time_proj=time_proj, timestep_dim=timestep_dim, layers=[cfg["layers_per_block"]] * len(ch),
            down_attention=lambda i: attention(groups, 1.0) if down_types[i] == "AttnDownBlock2D" else None,
            up_attention=lambda i: attention(groups, 1.0) if up_types[i] == "AttnUpBlock2D" else None,
            mid=None if cfg["mid_block_type"] is None else (1, mid_attention))
        self.config = cfg

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None) -> Tensor:
        """sample [B, in, H, W] (H, W divisible by 2 ** (levels - 1), as diffusers needs); timestep: a number (cast
        to long, as diffusers does), a 0-d or [B] tensor; class_labels [B] (or [B, temb] for "identity")."""
        if encoder_hidden_states is not None:
            raise ValueError("UNet2DModel has no cross-attention; encoder_hidden_states must be None")
        t = timestep_batch(timestep, sample, torch.long)  # [B]
        out = self.body(sample, self.embed(sample, t, class_labels), None)  # [B, out, H, W]
        if self.config["time_embedding_type"] == "fourier":
            out = out / t.reshape(-1, 1, 1, 1)  # NCSN++ predicts the score times sigma
        return out
