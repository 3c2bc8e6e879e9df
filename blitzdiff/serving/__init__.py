"""Serving: dynamic batching of concurrent requests for a Pipeline (batcher.py)."""

from .batcher import Batcher, BatcherClosed, BatchStats, QueueFull

__all__ = ["BatchStats", "Batcher", "BatcherClosed", "QueueFull"]
