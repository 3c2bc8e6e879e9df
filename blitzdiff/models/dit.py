"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie 2023), in diffusers' DiTTransformer2DModel layout.

Module and parameter names equal diffusers' state-dict keys, so a diffusers checkpoint loads with
`load_state_dict(strict=True)`; `dit_original.py` maps the original facebookresearch/DiT format onto them.

The network: patchify the latent with a strided conv and add a fixed 2-D sin-cos position embedding; run `depth`
transformer blocks conditioned on c = MLP(sinusoid(t)) + embed(y) through adaLN-Zero; a final adaLN-modulated
linear layer; unpatchify. adaLN-Zero: each block regresses six vectors from SiLU(c) (shift / scale / gate for the
attention branch, then for the MLP branch); shift and scale modulate a LayerNorm without affine weights, and the
gate multiplies the branch output before the residual add. The regression layer is zero-initialized in training, so
every gate starts at 0 and every block starts as the identity (the "Zero"); here weights always come from a
checkpoint, so nothing is initialized specially.

Where diffusers' DiT differs from the original (diffusers is the reference here):
- Every block owns a copy of the timestep / label embedders (`transformer_blocks.i.norm1.emb`); diffusers'
  converter writes the one original copy into all of them. Each block uses its own copy, and the final layer uses
  block 0's, exactly as diffusers does.
- The timestep sinusoid uses downscale_freq_shift=1 (frequencies 10000^(-j/127) for 256 channels); the original
  uses 0 (10000^(-j/128)).
- The MLP-branch LayerNorm has eps `norm_eps` (default 1e-5); the attention-branch and final ones have 1e-6, as in
  the original everywhere.

DiT learns the variance too (Nichol & Dhariwal 2021): with `out_channels == 2 * in_channels` the output holds the
prediction and then the variance interpolation values; `forward` returns both (diffusers' `.sample`) and
`split_learned_sigma` takes the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import (
    adaln_modulate,
    adaln_modulate_ref,
    gelu_tanh,
    gelu_tanh_ref,
    timestep_embedding,
    timestep_embedding_ref,
)
from ..kernels._backends import module_call
from ..kernels.adaln_modulate import adaln_gated_residual_module_cpu, adaln_modulate_module_cpu
from ..kernels.attention import BACKENDS as ATTENTION_BACKENDS
from ..kernels.gelu import BACKENDS as GELU_BACKENDS
from ..kernels.gelu import gelu_tanh_module_cpu
from ..kernels.timestep_embedding import timestep_embedding_module_cpu
from .conv import Conv2d
from .layers import TimestepEmbedding, attend  # TimestepEmbedding: DiT's t_embedder.mlp
from .linear import DirectLinear, Linear
from .packing import PackedParameters, PackingOwner, QKVPacking, eager_inference, packed_linear

# DiTTransformer2DModel's defaults (diffusers 0.42), i.e. DiT-XL/2 at 256x256 with a fixed (not learned) sigma.
DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# Accepted and ignored, as they do not change inference: dropout (training only), norm_num_groups (diffusers' DiT
# builds no GroupNorm), upcast_attention (diffusers' default SDPA processor ignores it; our kernel accumulates in fp32).
# Hub DiT checkpoints carry a legacy Transformer2DModel config, which diffusers remaps to DiTTransformer2DModel and
# whose extra fields it then drops. Accepted only at the values under which dropping them changes nothing.
LEGACY = {
    "cross_attention_dim": (None,), "num_vector_embeds": (None,), "use_linear_projection": (False,),
    "only_cross_attention": (False,), "double_self_attention": (False,), "attention_type": ("default",),
    "caption_channels": (None,), "interpolation_scale": (None, 1), "use_additional_conditions": (None, False),
}
POSITIVE_INTS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
                 "patch_size", "num_embeds_ada_norm")
TIME_FREQ_DIM = 256  # channels of the timestep sinusoid (diffusers' CombinedTimestepLabelEmbeddings, DiT)


def resolve_config(config: Mapping) -> dict[str, Any]:
    """A DiTTransformer2DModel config (keys starting with "_" ignored) -> all fields, validated."""
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in given.keys() - DEFAULTS.keys():
        if key not in LEGACY:
            raise ValueError(f"DiT config: unknown field {key!r}; known fields: {', '.join(sorted(DEFAULTS))}")
        if given[key] not in LEGACY[key]:
            raise ValueError(f"DiT config: {key}={given[key]!r} is not supported by DiTTransformer2DModel "
                             f"(allowed: {', '.join(map(repr, LEGACY[key]))})")
    cfg = {key: given.get(key, default) for key, default in DEFAULTS.items()}
    for key in POSITIVE_INTS:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"DiT config: {key} must be a positive integer, got {cfg[key]!r}")
    out = cfg["out_channels"]
    if out is not None and (not isinstance(out, int) or isinstance(out, bool) or out < 1):
        raise ValueError(f"DiT config: out_channels must be None (= in_channels) or a positive integer, got {out!r}")
    if cfg["norm_type"] != "ada_norm_zero":
        raise ValueError(f"DiT config: norm_type={cfg['norm_type']!r} is not supported (only 'ada_norm_zero')")
    if cfg["activation_fn"] != "gelu-approximate":
        raise ValueError(f"DiT config: activation_fn={cfg['activation_fn']!r} is not supported "
                         "(only 'gelu-approximate', DiT's tanh GELU)")
    if cfg["norm_elementwise_affine"] is not False:
        raise ValueError("DiT config: norm_elementwise_affine must be False (adaLN-Zero norms have no affine weights)")
    if not isinstance(cfg["attention_bias"], bool):
        raise ValueError(f"DiT config: attention_bias must be a bool, got {cfg['attention_bias']!r}")
    if not isinstance(cfg["norm_eps"], int | float) or not cfg["norm_eps"] > 0:
        raise ValueError(f"DiT config: norm_eps must be a positive number, got {cfg['norm_eps']!r}")
    if (cfg["num_attention_heads"] * cfg["attention_head_dim"]) % 4:
        raise ValueError("DiT config: num_attention_heads * attention_head_dim must be divisible by 4 "
                         "(the 2-D sin-cos position embedding splits it into 4 parts)")
    if cfg["sample_size"] < cfg["patch_size"]:
        raise ValueError(f"DiT config: sample_size ({cfg['sample_size']}) is smaller than patch_size "
                         f"({cfg['patch_size']})")
    return cfg


def split_learned_sigma(output: Tensor, in_channels: int) -> Tensor:
    """The prediction part of a DiT output: [B, 2C, H, W] -> its first C channels [B, C, H, W].

    With a learned sigma the last C channels are the variance interpolation values (Nichol & Dhariwal 2021), which
    the samplers here do not use (as diffusers' DiTPipeline drops them). An output of C channels (fixed sigma) is
    returned unchanged.
    """
    if output.shape[1] == 2 * in_channels:
        return output[:, :in_channels]
    if output.shape[1] == in_channels:
        return output
    raise ValueError(f"split_learned_sigma: output has {output.shape[1]} channels; expected in_channels "
                     f"({in_channels}) or 2 * in_channels (learned sigma)")


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): float32 [grid_h * grid_w, dim], row-major tokens.

    The first dim/2 channels encode the column, the last dim/2 the row ("w goes first", as in DiT and diffusers).
    Positions are scaled by base_size / grid so any grid spans the training grid (diffusers' PatchEmbed; the
    identity at the training size). float32 positions, float64 trigonometry, like diffusers, so values agree bitwise.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]

    def sincos(n: int) -> Tensor:  # n positions -> [n, dim/2]
        pos = torch.arange(n, dtype=torch.float32) / (n / base_size)
        angles = pos.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    cols = sincos(grid_w)[None, :, :].expand(grid_h, -1, -1)  # [h, w, dim/2]
    rows = sincos(grid_h)[:, None, :].expand(-1, grid_w, -1)  # [h, w, dim/2]
    return torch.cat([cols, rows], dim=-1).reshape(grid_h * grid_w, dim).float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a strided conv) plus the fixed position embedding.

    The position table is not a parameter and not in diffusers' state dict (a non-persistent buffer there); it is
    built on first use per (grid, device) and cached, so construction on the meta device needs no data.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, base_size: int):
        super().__init__()
        self.proj = Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.base_size = base_size  # the training grid, sample_size // patch_size
        self._pos_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        key = (grid_h, grid_w, device)
        if key not in self._pos_cache:
            table = sincos_pos_embed_2d(self.proj.out_channels, grid_h, grid_w, self.base_size)
            self._pos_cache[key] = table.to(device)
        return self._pos_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, D, h, w]
        pos = self.pos_embed(x.shape[2], x.shape[3], x.device)  # [h*w, D] float32
        # Tokens stored contiguous: the residual stream keeps the layout of the tensor it starts from (`x + gate *
        # f(x)` takes x's strides), and the transposed view made every residual add a strided kernel and every
        # fused adaLN call copy x first (DiT-XL/2 fp16 batch 128 on an H200: 58 copies and 2x slower adds per
        # forward, 16% of its device time).
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, D], N = h*w
        return (x + pos).to(x.dtype)  # [B, N, D]; added in float32 for half x, as diffusers does


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str) -> Tensor:
    """kernels.adaln_modulate of the residual stream x [B, N, D] by a block's own shift, scale [B, D], routed as
    layers.norm's GroupNorm (kernels._backends.module_call)."""
    return module_call(backend, adaln_modulate_module_cpu, adaln_modulate_ref, adaln_modulate, x, shift, scale, eps)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor, backend: str) -> Tensor:
    """adaLN-Zero's x + gate[:, None] * y for x, y [B, N, D], gate [B, D]: on "auto" in eager CPU sampling the C++
    kernel called directly (kernels.adaln_gated_residual_module_cpu, one pass, the same float32 bits), else torch's
    own ops on every backend (the op's CUDA and Triton kernels are not measured against them inside a DiT)."""
    if backend == "auto" and (out := adaln_gated_residual_module_cpu(x, y, gate)) is not None:
        return out
    return x + gate[:, None] * y


def _packed_conditioning(t_freq: Tensor, labels: Tensor, linear_1: tuple[Tensor, Tensor],
                         linear_2: tuple[Tensor, Tensor], table: tuple[Tensor], adaln: tuple[Tensor, Tensor],
                         direct: DirectLinear | None, backend: str) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
    """DiT.conditioning on the packed buffers of `depth` blocks: linear_1 [depth*D, 256] / [depth*D], linear_2
    [depth*D, D] / [depth*D], the label tables [depth*(classes+1), D], adaLN [depth*6D, D] / [depth*6D]; linear_1
    by models.linear's kernel on the "auto" backend where it applies (`direct`: its blocked copy)."""
    (w2, b2), (labels_table,), (wa, ba) = linear_2, table, adaln
    dim = w2.shape[1]
    depth = w2.shape[0] // dim
    h = F.silu(packed_linear(t_freq, linear_1, direct, backend)).view(-1, depth, dim).transpose(0, 1)  # [depth, B, D]
    c = torch.baddbmm(b2.view(depth, 1, dim), h, w2.view(depth, dim, dim).transpose(1, 2))  # [depth, B, D]
    # + each block's label row: [depth, B, D] (index_select: one gather kernel, with an out= form for CPU graphs;
    # advanced indexing took 40 us of a replayed dit-digits forward)
    c = c + torch.index_select(labels_table.view(depth, -1, dim), 1, labels)
    modulation = torch.baddbmm(ba.view(depth, 1, 6 * dim), F.silu(c),
                               wa.view(depth, 6 * dim, dim).transpose(1, 2))  # [depth, B, 6D]
    return c[0], [m.chunk(6, dim=1) for m in modulation.unbind(0)]


class LabelEmbedding(nn.Module):
    """Class label table with one extra row, index num_classes: the null label of classifier-free guidance.

    diffusers always builds it with class_dropout_prob 0.1 > 0, hence always the extra row. Training-time label
    dropout is not reproduced; a sampler asks for the unconditional output with label num_classes.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)  # [B] -> [B, D]


class CombinedTimestepLabelEmbeddings(nn.Module):
    """c = MLP(sinusoid(t)) + embed(y): DiT's conditioning vector."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_FREQ_DIM, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, t_freq: Tensor, labels: Tensor) -> Tensor:
        return self.timestep_embedder(t_freq) + self.class_embedder(labels)  # [B, D]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero regression: c -> SiLU -> Linear -> (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.emb = CombinedTimestepLabelEmbeddings(num_classes, dim)  # this block's copy (see module docstring)
        self.linear = Linear(dim, 6 * dim)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp: 6 x [B, D] (DiT's and diffusers' order)
        return self.linear(F.silu(c)).chunk(6, dim=1)


class Attention(QKVPacking, nn.Module):
    """Multi-head self-attention with separate q / k / v projections (diffusers' split of DiT's fused qkv; packed
    into one GEMM again by blitzdiff.load for eager inference: models.packing)."""

    KERNEL_BACKENDS: ClassVar[tuple[str, ...]] = ATTENTION_BACKENDS  # what set_backend may give it

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, heads * head_dim, bias=bias)
        self.to_k = Linear(dim, heads * head_dim, bias=bias)
        self.to_v = Linear(dim, heads * head_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(heads * head_dim, dim)])  # key `to_out.0` (diffusers: + dropout)
        self.backend = "ref"

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.project_qkv(x, self.heads)  # [B, H, N, Dh] each
        out = attend(q, k, v, self.backend)  # [B, H, N, Dh], scale 1/sqrt(Dh)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))  # [B, N, D]


class GELU(nn.Module):
    """Linear then tanh-approximate GELU (diffusers' GELU(approximate="tanh"), DiT's GELU(approximate="tanh")):
    kernels.gelu_tanh, routed as layers.norm's GroupNorm; "auto" on the CPU runs it in place on the projection."""

    KERNEL_BACKENDS: ClassVar[tuple[str, ...]] = GELU_BACKENDS  # what set_backend may give it

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = Linear(dim, inner_dim)
        self.backend = "ref"

    def forward(self, x: Tensor) -> Tensor:
        return module_call(self.backend, gelu_tanh_module_cpu, gelu_tanh_ref, gelu_tanh, self.proj(x))  # [B, N, inner]


class FeedForward(nn.Module):
    """MLP with ratio 4. `net` mirrors diffusers' [act+proj in, dropout, proj out] so keys are net.0 / net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)  # [B, N, 4D] after net.0, [B, N, D] after net.2
        return x


class DiTBlock(nn.Module):
    """One DiT block with adaLN-Zero conditioning (diffusers' BasicTransformerBlock, norm_type="ada_norm_zero")."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.norm1 = AdaLayerNormZero(dim, cfg["num_embeds_ada_norm"])
        self.attn1 = Attention(dim, cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["attention_bias"])
        self.ff = FeedForward(dim)
        self.mlp_norm_eps = cfg["norm_eps"]  # diffusers' norm3; the attention branch's norm has eps 1e-6
        self.backend = "ref"

    def forward(self, x: Tensor, modulation: tuple[Tensor, ...]) -> Tensor:
        """x [B, N, D]; modulation: this block's norm1 output, 6 x [B, D] (the DiT computes all blocks' at once)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = modulate(x, shift_msa, scale_msa, 1e-6, self.backend)  # [B, N, D]
        x = gated_residual(x, self.attn1(h), gate_msa, self.backend)  # [B, N, D]
        h = modulate(x, shift_mlp, scale_mlp, self.mlp_norm_eps, self.backend)  # [B, N, D]
        return gated_residual(x, self.ff(h), gate_mlp, self.backend)  # [B, N, D]


class DiT(PackingOwner, nn.Module):
    """Class-conditional latent DiT, diffusers' DiTTransformer2DModel (its config fields, its state-dict keys)."""

    diffusers_class: ClassVar[str] = "DiTTransformer2DModel"
    PACKED = ("_packed_conditioning",)
    _packed_conditioning: tuple[PackedParameters, ...] | None = None
    _packed_direct: DirectLinear | None = None  # the packed linear_1's blocked copy for models.linear's kernel

    def __init__(self, **config: Any):
        super().__init__()
        self.config = cfg = resolve_config(config)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.patch_size = p = cfg["patch_size"]
        self.in_channels = cfg["in_channels"]
        self.out_channels = cfg["out_channels"] or cfg["in_channels"]
        self.pos_embed = PatchEmbed(cfg["in_channels"], dim, p, cfg["sample_size"] // p)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg["num_layers"])])
        self.proj_out_1 = Linear(dim, 2 * dim)  # final layer's adaLN: shift, scale (no gate)
        self.proj_out_2 = Linear(dim, p * p * self.out_channels)
        self.backend = "ref"

    @classmethod
    def from_config(cls, config: Mapping) -> DiT:
        """From a diffusers config.json dict (DiTTransformer2DModel, or the legacy Transformer2DModel of Hub DiTs)."""
        return cls(**config)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None) -> Tensor:
        """sample [B, C, H, W], timestep (number, 0-d or [B]), class_labels [B] int (num_classes = the null label)
        -> the raw output [B, out_channels, H, W] (with a learned sigma: prediction, then variance values)."""
        B = self._check_inputs(sample, class_labels, encoder_hidden_states)
        p = self.patch_size
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(B)  # [B]
        elif t.shape != (B,):
            raise ValueError(f"DiT: timestep must be a number, 0-d or of shape [{B}], got {tuple(t.shape)}")
        h, w = sample.shape[2] // p, sample.shape[3] // p

        x = self.pos_embed(sample)  # [B, N, D], N = h*w
        t_freq = module_call(self.backend, timestep_embedding_module_cpu, timestep_embedding_ref, timestep_embedding, t,
                             TIME_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=1).to(x.dtype)  # [B, 256]
        c0, modulations = self.conditioning(t_freq, class_labels)
        for block, modulation in zip(self.transformer_blocks, modulations, strict=True):
            x = block(x, modulation)  # [B, N, D]

        shift, scale = self.proj_out_1(F.silu(c0)).chunk(2, dim=1)  # 2 x [B, D], from block 0's embedders
        x = modulate(x, shift, scale, 1e-6, self.backend)  # [B, N, D]
        x = self.proj_out_2(x)  # [B, N, p*p*C_out]
        x = x.reshape(B, h, w, p, p, self.out_channels)  # [B, h, w, p, p, C_out]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [B, C_out, h, p, w, p]
        return x.reshape(B, self.out_channels, h * p, w * p)  # [B, C_out, H, W]

    def conditioning(self, t_freq: Tensor, labels: Tensor) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """Block 0's c [B, D] and every block's modulation (6 x [B, D], rows of one [B, 6D] tensor) from t_freq
        [B, 256] and labels [B]: each block's embedders, then its norm1. Packed (pack_conditioning) and eager
        without gradients, all blocks at once: one linear, two batched GEMMs and one table lookup instead of ~8
        calls per block."""
        if (self._packed_conditioning is not None and eager_inference(t_freq)
                and (tensors := self.packed_buffers("_packed_conditioning"))):
            return _packed_conditioning(t_freq, labels, *tensors, self._packed_direct, self.backend)
        c = [block.norm1.emb(t_freq, labels) for block in self.transformer_blocks]  # depth x [B, D]
        return c[0], [block.norm1(c_block) for block, c_block in zip(self.transformer_blocks, c, strict=True)]

    def pack_conditioning(self) -> None:
        """Pack the blocks' embedders and adaLN layers (models.packing) for `conditioning`."""
        blocks = self.transformer_blocks
        linear = ("weight", "bias")
        self._packed_conditioning = (
            PackedParameters([b.norm1.emb.timestep_embedder.linear_1 for b in blocks], linear),
            PackedParameters([b.norm1.emb.timestep_embedder.linear_2 for b in blocks], linear),
            PackedParameters([b.norm1.emb.class_embedder.embedding_table for b in blocks], ("weight",)),
            PackedParameters([b.norm1.linear for b in blocks], linear))
        self._packed_direct = DirectLinear()

    def _check_inputs(self, sample: Tensor, class_labels: Tensor | None, encoder_hidden_states: Tensor | None) -> int:
        """Shape / type checks at the public boundary (host metadata only, no device sync); returns the batch size."""
        if encoder_hidden_states is not None:
            raise ValueError("DiT: encoder_hidden_states must be None (DiT is class-conditional, no cross-attention)")
        if sample.ndim != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(f"DiT: sample must be [B, {self.in_channels}, H, W], got {tuple(sample.shape)}")
        if sample.shape[2] % self.patch_size or sample.shape[3] % self.patch_size:
            raise ValueError(f"DiT: sample height and width must be multiples of patch_size ({self.patch_size}), "
                             f"got {tuple(sample.shape[2:])}")
        B = sample.shape[0]
        if class_labels is None:
            raise ValueError("DiT: class_labels is required (a [B] integer tensor; use "
                             f"{self.config['num_embeds_ada_norm']}, the null label, for the unconditional output)")
        if not isinstance(class_labels, Tensor) or class_labels.shape != (B,) or class_labels.is_floating_point():
            got = (class_labels.dtype, tuple(class_labels.shape)) if isinstance(class_labels, Tensor) else class_labels
            raise ValueError(f"DiT: class_labels must be an integer tensor of shape [{B}], got {got!r}")
        return B
