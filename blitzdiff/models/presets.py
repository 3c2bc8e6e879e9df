"""Published architectures with random weights, for speed work: the networks of public checkpoints, built from their
config.json, filled with a deterministic scaled initialization (no download, no checkpoint on disk).

A preset is the denoiser's class and config plus the scheduler config of the public pipeline, so
`Pipeline(*build_preset(name), None, name=name)` samples with it (raw latents: there is no VAE). The weights are
not trained, so samples are noise-like; the point is that the network does the same work as the real one (shapes,
FLOPs, memory traffic) with activations of order one (the largest intermediate value of a full-size float32 forward
is about 30), so timings carry over and float16 / bfloat16 runs stay finite.

Initialization (`init_random_weights`): every conv / linear weight ~ N(0, 1/fan_in) (LeCun normal: unit-variance
inputs give unit-variance pre-activations), biases 0, norm affine weights 1 and biases 0, embedding tables ~ N(0, 1)
(an embedding is a linear map of a one-hot input, fan_in 1). The pre-norm residual design of both families keeps
activations O(1) under it: each residual branch starts from a normalized input, so the residual stream grows only
with the square root of the depth, and the output head reads a normalized stream. Training recipes zero some layers
(DiT's adaLN-Zero regressions and final layer; the original LDM UNet's last conv of each residual block, attention
proj_out and output conv); here they get the same random init as everything else, because a zero gate turns every
block into the identity and a zero output layer makes the output identically zero: degenerate math that a
benchmark or a numerical check must not run on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .placement import resolve_device, resolve_dtype
from .registry import model_class


@dataclass(frozen=True)
class Preset:
    """A public checkpoint's architecture: the diffusers class, its config.json, its pipeline's scheduler config."""

    model_class: str  # diffusers class name, a key of registry.MODEL_CLASSES
    model_config: Mapping[str, Any]  # the checkpoint's config.json (JSON arrays as tuples, so the preset is immutable)
    scheduler_config: Mapping[str, Any]  # the pipeline's scheduler/scheduler_config.json (see SD 1.5's note)
    source: str  # the Hugging Face Hub repository both configs come from


# runwayml/stable-diffusion-v1-5, unet/config.json (859,520,964 parameters).
_SD15_UNET = MappingProxyType({
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280), "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
})
# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json, except the class: the published one is a
# PNDMScheduler (with skip_prk_steps: PLMS), which blitzdiff does not implement. DDIM reads the same fields (the
# scaled-linear betas, "leading" timesteps shifted by steps_offset 1, set_alpha_to_one false; clip_sample is false
# in the published file too) and is the scheduler most often swapped into SD 1.5, so the pipeline samples with no
# sampler= argument. skip_prk_steps is PNDM's own field; scheduler resolution drops it like diffusers' from_config.
_SD15_SCHEDULER = MappingProxyType({
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
})
# facebook/DiT-XL-2-256, transformer/config.json: the legacy Transformer2DModel config that diffusers remaps to
# DiTTransformer2DModel (registry.LEGACY_CLASSES). Learned sigma (out_channels 8 = 2 x 4). 749,826,464 parameters
# in diffusers' layout (each block owns a copy of the embedders); the paper's 675M counts the original layout.
_DIT_XL_2_256 = MappingProxyType({
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
})
# facebook/DiT-XL-2-256 (and -512), scheduler/scheduler_config.json: DDIM over DDPM's linear betas, as diffusers'
# convert_dit_to_diffusers.py saved it.
_DIT_SCHEDULER = MappingProxyType({
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None,
})

PRESETS: dict[str, Preset] = {
    # SD 1.5 at 512x512 pixels: 64x64x4 latents, 77-token CLIP ViT-L/14 context [B, 77, 768].
    "sd15-unet": Preset("UNet2DConditionModel", _SD15_UNET, _SD15_SCHEDULER, "runwayml/stable-diffusion-v1-5"),
    # DiT-XL/2 at 256x256 pixels: 32x32x4 latents, 256 tokens; ImageNet class labels 0..999 (1000: the null label).
    "dit-xl-2-256": Preset("DiTTransformer2DModel", _DIT_XL_2_256, _DIT_SCHEDULER, "facebook/DiT-XL-2-256"),
    # DiT-XL/2 at 512x512 pixels: 64x64x4 latents, 1024 tokens; the same parameters (the position table is computed).
    "dit-xl-2-512": Preset("DiTTransformer2DModel", MappingProxyType({**_DIT_XL_2_256, "sample_size": 64}),
                           _DIT_SCHEDULER, "facebook/DiT-XL-2-512"),
}


def build_preset(name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                 seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """(model, scheduler_config) of preset `name` with random weights from `seed`, ready for
    `Pipeline(model, scheduler_config, None, name=name)`. device: default CPU ("meta": shapes only, no weights);
    dtype: default float32."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    model = build_random(preset.model_class, preset.model_config, device=device, dtype=dtype, seed=seed)
    return model, dict(preset.scheduler_config)


def build_random(class_name: str, config: Mapping[str, Any], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, seed: int = 0) -> nn.Module:
    """A blitzdiff model of diffusers class `class_name` from `config`, in eval mode, with random weights.

    Built on the meta device (no memory, no default init), cast there, then allocated once on `device` in `dtype`
    and filled by `init_random_weights`: peak memory is the model plus its largest parameter in float32.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    device, dtype = resolve_device(device, allow_meta=True), resolve_dtype(dtype)
    with torch.device("meta"):
        model = model_class(class_name).from_config(config).to(dtype=dtype)
    # to_empty leaves every tensor uninitialized: fine for parameters (all initialized below), wrong for a buffer
    # computed at construction. Our models compute such tables lazily in forward (DiT's position embedding).
    assert not any(True for _ in model.buffers()), f"{class_name} has buffers; initialize them after to_empty"
    if device.type != "meta":
        init_random_weights(model.to_empty(device=device), seed)
    return model.eval()


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of `model` in place (see the module docstring for the rules); returns `model`.

    Deterministic: parameters are drawn in `named_modules` order from one generator seeded with `seed`, in float32
    (so a float16 / bfloat16 model holds the rounded weights of the float32 one on the same device). The generator
    lives on the parameters' device for CUDA (fast) and on the CPU otherwise (copied over): the same seed gives
    different weights on CPU and CUDA. A parameter with no rule (a module type not listed) is a ValueError.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.Linear | nn.Conv2d):
            _normal_(module.weight, module.weight[0].numel() ** -0.5, generator)  # fan_in = in_channels * kernel
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, 1.0, generator)
        else:
            raise ValueError(f"init_random_weights: no rule for the parameters of {name!r} "
                             f"({type(module).__name__}); known: Linear, Conv2d, GroupNorm, LayerNorm, Embedding")
    return model


def _normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """param <- N(0, std^2) drawn in float32 on the generator's device (in place where that is param itself)."""
    if param.dtype == torch.float32 and param.device == generator.device:
        param.normal_(0.0, std, generator=generator)
    else:
        param.copy_(torch.empty(param.shape, device=generator.device).normal_(0.0, std, generator=generator))
