"""Sampling at scale: N samples written as resumable shards by the ranks of a torchrun job, packed into one
samples.npz in ADM's evaluation layout (`blitzdiff sample -n N --out-dir DIR`, `blitzdiff pack DIR`)."""

from .folder import pack
from .job import JobFailed, JobSummary, sample_to_folder
from .world import JobRefused, World, join, rank_device

__all__ = ["JobFailed", "JobRefused", "JobSummary", "World", "join", "pack", "rank_device", "sample_to_folder"]
