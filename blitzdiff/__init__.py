"""blitzdiff: a high-performance, sync-free sampling engine for diffusion models."""

from .engine.config import SAMPLERS, resolve
from .engine.functional import sample

__all__ = ["SAMPLERS", "resolve", "sample"]
__version__ = "0.1.0"
