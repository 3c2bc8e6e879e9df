"""Networks (diffusers-compatible UNets, DiT, the VAE decoder) and loading them from checkpoints."""

from .checkpoint import PipelineFiles, describe, load_component, load_model, read_pipeline
from .packing import pack_projections
from .presets import PRESETS, build_preset, init_random_weights
from .registry import (
    MODEL_CLASSES,
    check_backend,
    default_backend,
    default_channels_last,
    model_class,
    set_backend,
    set_channels_last,
)

__all__ = [
    "MODEL_CLASSES", "PRESETS", "PipelineFiles", "build_preset", "check_backend", "default_backend",
    "default_channels_last", "describe", "init_random_weights", "load_component", "load_model", "model_class",
    "pack_projections", "read_pipeline", "set_backend", "set_channels_last",
]
