"""Networks (diffusers-compatible UNets, DiT, the VAE decoder) and loading them from checkpoints."""

from .checkpoint import PipelineFiles, describe, load_component, load_model, read_pipeline
from .registry import MODEL_CLASSES, model_class, set_backend

__all__ = [
    "MODEL_CLASSES", "PipelineFiles", "describe", "load_component", "load_model", "model_class", "read_pipeline",
    "set_backend",
]
