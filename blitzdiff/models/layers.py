"""Building blocks of diffusers' UNets and VAE decoder, under diffusers' module and parameter names.

Every module keeps diffusers' state-dict names (`norm1`, `to_q`, `to_out.0`, `ff.net.2`, `downsamplers.0.conv`, ...)
so a diffusers checkpoint loads with `load_state_dict(strict=True)` and no key mapping. Sources (diffusers 0.42):
`models/embeddings.py` (Timesteps, TimestepEmbedding, GaussianFourierProjection), `models/resnet.py`
(ResnetBlock2D), `downsampling.py` / `upsampling.py`, `attention_processor.py` (Attention with AttnProcessor2_0),
`attention.py` (BasicTransformerBlock, FeedForward), `activations.py` (GEGLU), `transformers/transformer_2d.py`
(continuous input) and `unets/unet_2d_blocks.py` (the down / mid / up block containers). Only the inference math is
kept: no dropout, attention masks, processors or gradient checkpointing. Modules that call a `blitzdiff.kernels`
op hold `self.backend` (which `blitzdiff.models.set_backend` sets) and, when one of their ops lacks some backend,
`KERNEL_BACKENDS`: the ones all of them take.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import attention, attention_ref, group_norm, group_norm_ref, timestep_embedding, timestep_embedding_ref
from ..kernels._backends import module_call
from ..kernels.attention import BACKENDS as ATTENTION_BACKENDS
from ..kernels.attention import attention_module_cpu
from ..kernels.group_norm import group_norm_module_cpu
from ..kernels.timestep_embedding import timestep_embedding_module_cpu
from .conv import Conv2d
from .linear import Linear
from .packing import QKVPacking, split_heads

# (channels, layer index within its block) -> the attention module after that layer's resnet
AttentionFactory = Callable[[int, int], nn.Module]
# (in_channels, out_channels) -> a ResnetBlock2D with the model's norm / time-embedding settings
ResnetFactory = Callable[[int, int], nn.Module]


# --- config resolution (diffusers' from_config, strict) ---------------------------------------------------------

def resolve_config(cls_name: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' class defaults overlaid by `config` (keys starting with "_" dropped); an unknown field is an error."""
    given = {key: value for key, value in config.items() if not key.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{cls_name}: unknown config field(s) {unknown}; known fields: {sorted(defaults)}")
    return copy.deepcopy({**defaults, **given})


def require(cls_name: str, field: str, value: Any, allowed: Collection[Any]) -> None:
    """ValueError naming `field` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{cls_name}: {field}={value!r} is not supported; supported: {list(allowed)}")


def per_block(cls_name: str, field: str, value: Any, n: int) -> list[Any]:
    """An int-or-list config field (diffusers broadcasts a scalar to every down block) as a list of n entries."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{cls_name}: {field} has {len(values)} entries; it needs one per down block ({n})")
    return values


# --- time and class embeddings ------------------------------------------------------------------------------------

def timestep_batch(timestep: Tensor | float, sample: Tensor, number_dtype: torch.dtype | None = None) -> Tensor:
    """diffusers' timestep argument as a [B] tensor on sample's device.

    A Python number becomes a tensor of `number_dtype` (UNet2DModel casts to long, truncating a float, and we match
    it), else float64 for a float and int64 for an int (UNet2DConditionModel). A 0-d / one-element tensor is broadcast
    to the batch.
    """
    batch = sample.shape[0]
    if not torch.is_tensor(timestep):
        dtype = number_dtype or (torch.float64 if isinstance(timestep, float) else torch.long)
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    if timestep.numel() not in (1, batch):
        raise ValueError(f"timestep has {timestep.numel()} elements; a number, a 0-d tensor or one per sample "
                         f"({batch}) is allowed")
    return timestep.reshape(-1).to(sample.device).expand(batch)


class Timesteps(nn.Module):
    """Sinusoidal embedding of [B] timesteps -> float32 [B, dim] (diffusers' `Timesteps`; no parameters)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.downscale_freq_shift = dim, flip_sin_to_cos, downscale_freq_shift
        self.backend = "ref"

    def forward(self, t: Tensor) -> Tensor:
        return module_call(self.backend, timestep_embedding_module_cpu, timestep_embedding_ref, timestep_embedding, t,
                           self.dim, flip_sin_to_cos=self.flip_sin_to_cos,
                           downscale_freq_shift=self.downscale_freq_shift)  # [B, dim]


class GaussianFourierProjection(nn.Module):
    """Score-SDE / NCSN++ noise-level features [sin, cos](2 pi log(sigma) W): UNet2DModel's "fourier" embedding.

    W (`weight`, [size]) was drawn once at training and is stored in the checkpoint; [B] -> [B, 2 * size].
    """

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, sigma: Tensor) -> Tensor:
        x = torch.log(sigma)[:, None] * self.weight[None, :] * 2 * math.pi  # diffusers' operation order, bit for bit
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' `TimestepEmbedding` with act_fn silu, no cond_proj / post_act)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


CLASS_EMBED_TYPES = (None, "timestep", "identity")


def class_embedding(class_embed_type: str | None, num_class_embeds: int | None, timestep_dim: int,
                    time_embed_dim: int) -> nn.Module | None:
    """diffusers' `class_embedding`: a label table (type None with num_class_embeds), an MLP on the sinusoidal
    embedding of the label ("timestep"), or the caller's own [B, time_embed_dim] embedding ("identity")."""
    assert class_embed_type in CLASS_EMBED_TYPES
    if class_embed_type == "timestep":
        return TimestepEmbedding(timestep_dim, time_embed_dim)
    if class_embed_type == "identity":
        return nn.Identity()
    return None if num_class_embeds is None else nn.Embedding(num_class_embeds, time_embed_dim)


# --- convolutional blocks ----------------------------------------------------------------------------------------

def norm(module: nn.GroupNorm, x: Tensor, backend: str, **fused: Any) -> Tensor:
    """An nn.GroupNorm's parameters applied by kernels.group_norm (which fuses scale / shift / SiLU).

    Routed by kernels._backends.module_call: "ref" runs the spec directly (the op's argument checks, a few us a
    call, would repeat what the module's own parameters guarantee; unet-digits makes 30 such calls per forward);
    "auto" on the CPU calls the C++ kernel directly in eager sampling (kernels.group_norm_module_cpu) and traces
    the spec under torch.compile."""
    parameters = module._parameters  # what module.weight reads, without nn.Module's __getattr__ (0.5 us each)
    return module_call(backend, group_norm_module_cpu, group_norm_ref, group_norm, x, module.num_groups,
                       parameters["weight"], parameters["bias"], module.eps, **fused)


class ProjectedTime:
    """Every resnet's time projection of one forward, computed by one GEMM from packed weights (UNetBody's
    pack_conditioning): `projected` [B, sum of the resnets' projection widths]; `columns(resnet)` is a resnet's own
    [B, proj] (a view). Passed down the blocks in place of the time embedding, so the blocks' signatures stay."""

    __slots__ = ("projected",)

    def __init__(self, projected: Tensor):
        self.projected = projected

    def columns(self, resnet: ResnetBlock2D) -> Tensor:
        return self.projected[:, resnet.projection_columns]


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, time embedding, GroupNorm-SiLU-conv, plus a (1x1 conv) shortcut: DDPM / ADM's block.

    time_embedding_norm "default" adds time_emb_proj(emb) before norm2; "scale_shift" is ADM's AdaGN,
    norm2(h) * (1 + scale) + shift. temb_channels None: no time embedding (the VAE decoder).
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int, eps: float,
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0):
        super().__init__()
        assert time_embedding_norm in ("default", "scale_shift")
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        proj_dim = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = None if temb_channels is None else Linear(temb_channels, proj_dim)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.time_embedding_norm, self.output_scale_factor = time_embedding_norm, output_scale_factor
        self.backend = "ref"
        # columns of the UNet's packed time projections (ProjectedTime) holding this block's, once packed
        self.projection_columns: slice | None = None

    def forward(self, x: Tensor, temb: Tensor | ProjectedTime | None) -> Tensor:
        """x: [B, in, H, W]; temb: SiLU(time embedding) [B, temb_channels] (diffusers applies the SiLU in every
        block; the UNet applies it once), or the UNet's packed projections of it (ProjectedTime), or None -> [B,
        out, H, W]."""
        h = self.conv1(norm(self.norm1, x, self.backend, silu=True))  # [B, out, H, W]
        if self.time_emb_proj is None:
            h = norm(self.norm2, h, self.backend, silu=True)
        else:
            projected = temb.columns(self) if isinstance(temb, ProjectedTime) else self.time_emb_proj(temb)  # [B, p]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = projected.chunk(2, dim=1)  # [B, out] each
                h = norm(self.norm2, h, self.backend, scale=scale, shift=shift, silu=True)
            else:
                h = norm(self.norm2, h + projected[:, :, None, None], self.backend, silu=True)
        h = self.conv2(h)  # [B, out, H, W]
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h if self.output_scale_factor == 1.0 else (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (diffusers' Downsample2D, use_conv=True); padding 0 first pads right and bottom by one."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # [B, C, ceil(H / 2), ceil(W / 2)] for padding 1


class Upsample2D(nn.Module):
    """Nearest 2x (or to `size`: the skip's size for odd inputs, as UNet2DConditionModel does) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


# --- attention ----------------------------------------------------------------------------------------------------

def attend(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """kernels.attention of a model's own q [B, H, Lq, D] and k, v [B, H, Lk, D]. "auto" in eager CPU sampling calls
    the C++ kernel directly (kernels.attention_module_cpu); "ref", and "auto" on the CPU where the kernel does not
    take the call (other dtypes, gradients, tracing and torch.compile), run the spec directly, as `norm` does: the
    op's argument checks would repeat SDPA's."""
    if backend == "auto" and (out := attention_module_cpu(q, k, v)) is not None:
        return out
    on_cpu_auto = backend == "auto" and q.device.type == "cpu"
    return attention_ref(q, k, v) if backend == "ref" or on_cpu_auto else attention(q, k, v, backend=backend)


class Attention(QKVPacking, nn.Module):
    """diffusers' `Attention` as the UNets use it: optional GroupNorm, to_q / to_k / to_v, multi-head softmax
    attention (kernels.attention, scale 1/sqrt(dim_head)), to_out.0, optional residual and output rescale.

    cross_attention_dim: the context's width for cross-attention (None: self-attention over x, whose projections
    blitzdiff.load packs into one GEMM: models.packing).
    """

    KERNEL_BACKENDS: ClassVar[tuple[str, ...]] = ATTENTION_BACKENDS  # what set_backend may give it (GroupNorm has more)

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0):
        super().__init__()
        inner, kv_dim = heads * dim_head, cross_attention_dim or query_dim
        self.group_norm = None if norm_num_groups is None else nn.GroupNorm(norm_num_groups, query_dim, eps)
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(kv_dim, inner, bias=bias)
        self.to_v = Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])  # diffusers' to_out.1 is a Dropout
        self.heads, self.residual_connection, self.rescale_output_factor = heads, residual_connection, \
            rescale_output_factor
        self.cross_attention = cross_attention_dim is not None
        self.backend = "ref"

    def packable(self) -> bool:
        return not self.cross_attention

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: [B, L, C] tokens or [B, C, H, W] features (attending over the H*W positions); context: [B, Lc, Cc]."""
        residual = x
        if self.group_norm is not None:
            assert x.dim() == 4, "the attention GroupNorm normalizes feature maps"
            x = norm(self.group_norm, x, self.backend)
        tokens = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x  # [B, L, C]
        if context is None:
            q, k, v = self.project_qkv(tokens, self.heads)  # [B, heads, L, D] each
        else:  # context [B, Lk, Ck]: k, v [B, heads, Lk, D]
            q, k, v = (split_heads(self.to_q(tokens), self.heads), split_heads(self.to_k(context), self.heads),
                       split_heads(self.to_v(context), self.heads))
        b, n = tokens.shape[0], tokens.shape[1]
        out = attend(q, k, v, self.backend).transpose(1, 2).reshape(b, n, -1)  # [B, L, heads * D]
        out = self.to_out[0](out)  # [B, L, C]
        if residual.dim() == 4:
            out = out.transpose(1, 2).reshape(residual.shape)  # [B, C, H, W]
        if self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


def spatial_attention(channels: int, *, head_dim: int, norm_num_groups: int | None, eps: float,
                      rescale_output_factor: float = 1.0) -> Attention:
    """The self-attention block over feature maps of UNet2DModel and the VAE (diffusers' deprecated AttentionBlock
    layout: GroupNorm, biased projections, residual); channels // head_dim heads of head_dim."""
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_num_groups=norm_num_groups, eps=eps, residual_connection=True,
                     rescale_output_factor=rescale_output_factor)


class GEGLU(nn.Module):
    """proj to 2 * dim_out, then value * GELU(gate) (Shazeer 2020); erf GELU as diffusers."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x hidden width; `net` indices are diffusers' (net.1 is its dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block of Stable Diffusion: self-attention, cross-attention on the context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x  # [B, L, dim]
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer (diffusers' Transformer2DModel, continuous input, layer_norm blocks): GroupNorm (eps 1e-6),
    proj_in (1x1 conv, or linear with use_linear_projection), transformer blocks, proj_out, residual."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, *, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner) if use_linear_projection else Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim) for _ in range(num_layers))
        self.proj_out = Linear(inner, in_channels) if use_linear_projection else Conv2d(inner, in_channels, 1)
        self.use_linear_projection = use_linear_projection
        self.backend = "ref"

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = norm(self.norm, x, self.backend)  # [B, C, H, W]
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, height * width, c))  # [B, HW, inner]
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(b, height * width, -1)  # [B, HW, inner]
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        else:
            h = self.proj_out(h.reshape(b, height, width, -1).permute(0, 3, 1, 2).contiguous())  # [B, C, H, W]
        return h + x


# --- block containers ---------------------------------------------------------------------------------------------

def _attentions(attention: AttentionFactory | None, channels: int, count: int) -> nn.ModuleList | None:
    """A block's attention modules, one per layer; None for a block without attention."""
    return None if attention is None else nn.ModuleList(attention(channels, i) for i in range(count))


class DownBlock(nn.Module):
    """diffusers' DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D: resnets, each followed by its attention when
    the block has attention, then an optional stride-2 conv. Returns the features and the skips it adds."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, resnet: ResnetFactory,
                 attention: AttentionFactory | None, downsample_padding: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(num_layers))
        self.attentions = _attentions(attention, out_channels, num_layers)
        self.downsamplers = None if downsample_padding is None else nn.ModuleList(
            [Downsample2D(out_channels, downsample_padding)])

    def forward(self, x: Tensor, temb: Tensor | None, context: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D / UNetMidBlock2DCrossAttn: a resnet, then num_layers (attention, resnet) pairs
    (no attention when the factory is None: UNetMidBlock2D with add_attention=False)."""

    def __init__(self, channels: int, num_layers: int, *, resnet: ResnetFactory, attention: AttentionFactory | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(channels, channels) for _ in range(num_layers + 1))
        self.attentions = _attentions(attention, channels, num_layers)

    def forward(self, x: Tensor, temb: Tensor | None, context: Tensor | None) -> Tensor:
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            x = resnet(x, temb)
        return x


class UpBlock(nn.Module):
    """diffusers' UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D / UpDecoderBlock2D: each resnet reads the features
    concatenated with the newest skip (no skips in the VAE decoder), then its attention; then an optional upsample.

    resnet_in_channels: the input width of each resnet (features plus skip).
    """

    def __init__(self, resnet_in_channels: Sequence[int], out_channels: int, *, resnet: ResnetFactory,
                 attention: AttentionFactory | None, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnet(c, out_channels) for c in resnet_in_channels)
        self.attentions = _attentions(attention, out_channels, len(resnet_in_channels))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: Tensor, temb: Tensor | None, context: Tensor | None, skips: Sequence[Tensor] = (),
                size: Sequence[int] | None = None) -> Tensor:
        """skips: this block's skip features, oldest first (consumed newest first); size: the upsampled H, W."""
        assert len(skips) in (0, len(self.resnets))
        for i, resnet in enumerate(self.resnets):
            if skips:
                x = torch.cat([x, skips[-1 - i]], dim=1)  # [B, C + C_skip, H, W]
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x
