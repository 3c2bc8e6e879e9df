"""The original facebookresearch/DiT checkpoint format (DiT-*.pt) mapped onto diffusers' DiTTransformer2DModel layout.

Original keys (DiT models.py) and their diffusers names, as diffusers' scripts/convert_dit_to_diffusers.py maps them:

    x_embedder.proj.{weight,bias}             -> pos_embed.proj.*
    t_embedder.mlp.{0,2}.*                    -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}.*
    y_embedder.embedding_table.weight         -> transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight
    blocks.{i}.attn.qkv.*                     -> transformer_blocks.{i}.attn1.to_{q,k,v}.* (rows split in thirds)
    blocks.{i}.attn.proj.*                    -> transformer_blocks.{i}.attn1.to_out.0.*
    blocks.{i}.mlp.fc1.* / fc2.*              -> transformer_blocks.{i}.ff.net.0.proj.* / ff.net.2.*
    blocks.{i}.adaLN_modulation.1.*           -> transformer_blocks.{i}.norm1.linear.*
    final_layer.adaLN_modulation.1.*          -> proj_out_1.*
    final_layer.linear.*                      -> proj_out_2.*
    pos_embed                                 -> dropped (the fixed sin-cos table, recomputed by the model)

The one shared timestep / label embedder becomes every block's copy (the same tensor object in each entry, so
`load_state_dict(assign=True)` keeps one copy in memory). The model then computes what diffusers' converted DiT
computes, which differs slightly from the original network: see blitzdiff/models/dit.py (timestep frequency shift,
MLP-branch LayerNorm eps).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .dit import DEFAULTS

# Official presets (DiT models.py, DiT_models): hidden size -> attention heads.
HEADS_BY_HIDDEN_SIZE = {1152: 16, 1024: 16, 768: 12, 384: 6}  # XL, L, B, S
VAE_DOWNSAMPLE = 8  # DiT runs on the latents of the Stable Diffusion VAE: latent size = image size / 8

_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_SHARED_RENAMES = {  # original -> name inside transformer_blocks.{i}.norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}
_TOP_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def _check_format(state_dict: Mapping[str, Tensor]) -> int:
    """Raise ValueError unless this is an original DiT state dict; returns the number of blocks."""
    if "ema" in state_dict or "model" in state_dict:
        raise ValueError("original DiT checkpoint: this is a training checkpoint; pass its 'ema' (or 'model') entry")
    required = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "blocks.0.attn.qkv.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not an original DiT state dict: missing {', '.join(missing)}")
    indices = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.fullmatch(key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"original DiT state dict: block indices are not 0..n-1: {sorted(indices)}")
    return len(indices)


def original_dit_config(state_dict: Mapping[str, Tensor], *, image_size: int | None = None) -> dict[str, Any]:
    """A DiTTransformer2DModel config (all fields) inferred from an original DiT state dict's shapes.

    The latent size comes from `image_size` (pixels, / 8 for the VAE) or, without it, from the stored `pos_embed`
    table (trained grid x patch size). Heads come from the official presets by hidden size (DiT-XL/L/B/S).
    """
    depth = _check_format(state_dict)
    hidden, in_channels, patch, patch_w = state_dict["x_embedder.proj.weight"].shape  # conv [D, C_in, p, p]
    if patch != patch_w:
        raise ValueError(f"original DiT state dict: non-square patches {patch}x{patch_w}")
    if hidden not in HEADS_BY_HIDDEN_SIZE:
        raise ValueError(f"original DiT state dict: hidden size {hidden} is not a DiT preset "
                         f"(known: {', '.join(map(str, HEADS_BY_HIDDEN_SIZE))} for XL, L, B, S)")
    heads = HEADS_BY_HIDDEN_SIZE[hidden]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)  # 2 * C_in: learned sigma
    num_classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1  # last row: the null (CFG) label

    pos_size = None
    if "pos_embed" in state_dict:  # [1, grid*grid, D]
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
        if grid * grid != state_dict["pos_embed"].shape[1]:
            raise ValueError(f"original DiT state dict: pos_embed has {state_dict['pos_embed'].shape[1]} tokens, "
                             "not a square grid")
        pos_size = grid * patch
    if image_size is not None:
        if image_size % VAE_DOWNSAMPLE:
            raise ValueError(f"image_size must be a multiple of {VAE_DOWNSAMPLE} (the VAE's factor), got {image_size}")
        sample_size = image_size // VAE_DOWNSAMPLE
        if pos_size is not None and pos_size != sample_size:
            raise ValueError(f"image_size {image_size} (latent {sample_size}) contradicts the checkpoint's pos_embed "
                             f"(trained at latent {pos_size}, image {pos_size * VAE_DOWNSAMPLE}); other sizes run "
                             "by passing larger samples to the model")
    elif pos_size is not None:
        sample_size = pos_size
    else:
        raise ValueError("original DiT state dict has no pos_embed: pass image_size (e.g. 256 or 512)")

    # Everything else keeps diffusers' defaults, as diffusers' converter does (norm_eps 1e-5 included).
    return {**DEFAULTS, "num_attention_heads": heads, "attention_head_dim": hidden // heads,
            "in_channels": in_channels, "out_channels": out_channels, "num_layers": depth,
            "sample_size": sample_size, "patch_size": patch, "num_embeds_ada_norm": num_classes}


def original_dit_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original DiT state dict to diffusers' keys (see the module docstring). The input is not modified;
    an unknown key is a ValueError."""
    depth = _check_format(state_dict)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name, _, kind = key.rpartition(".")  # kind: weight / bias
        if key == "pos_embed":
            continue
        if name in _TOP_RENAMES:
            out[f"{_TOP_RENAMES[name]}.{kind}"] = value
        elif name in _SHARED_RENAMES:
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.{_SHARED_RENAMES[name]}.{kind}"] = value
        elif (m := _BLOCK_KEY.fullmatch(key)) and m.group(2) == "attn.qkv":
            q, k, v = value.chunk(3, dim=0)  # [3D, ...]: rows are q, then k, then v (timm Attention)
            for proj, part in zip("qkv", (q, k, v), strict=True):
                out[f"transformer_blocks.{m.group(1)}.attn1.to_{proj}.{kind}"] = part
        elif m and m.group(2) in _BLOCK_RENAMES:
            out[f"transformer_blocks.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}.{kind}"] = value
        else:
            raise ValueError(f"original DiT state dict: unexpected key {key!r}")
    return out
