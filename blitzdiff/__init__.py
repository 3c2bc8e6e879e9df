"""blitzdiff: a high-performance, sync-free sampling engine for diffusion models."""

from .engine.config import SAMPLERS, resolve
from .engine.functional import sample
from .engine.loading import load
from .engine.pipeline import Pipeline
from .malloc import tune_malloc
from .models import load_model

__all__ = ["SAMPLERS", "Pipeline", "load", "load_model", "resolve", "sample", "tune_malloc"]
__version__ = "0.1.0"
