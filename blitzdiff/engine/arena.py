"""Static memory planning for a recorded forward (blitzdiff.engine.cpu_graph): one arena holds every buffer the
forward made, a buffer at an offset that no buffer alive at the same time overlaps.

A CPU graph first recorded each intermediate in its own allocation, all held for the graph's life: 33.1 MiB for
dit-digits' guided batch-8 forward, larger than the L3 its kernels then stream through, where an eager forward
reuses freed memory that is still in cache. Lifetimes are step indices of the replay: a buffer is born at the step
that first writes it and dies after the last step that reads or writes it (views included: lifetimes are per
storage). Two buffers may share memory when their lifetimes do not overlap.
"""

from __future__ import annotations

from typing import NamedTuple

ALIGNMENT = 64  # bytes: a cache line, and what glibc and torch align large CPU allocations to


class Lifetime(NamedTuple):
    nbytes: int
    birth: int  # the first step that writes it (a step index of the replay)
    death: int  # the last step that reads or writes it (>= birth)


def plan_arena(lifetimes: list[Lifetime]) -> tuple[list[int], int]:
    """(each buffer's byte offset, the arena's size in bytes) for buffers listed in order of birth: first fit, each
    buffer at the lowest aligned offset where it overlaps no placed buffer whose lifetime meets its own."""
    placed: list[tuple[int, int, Lifetime]] = []  # (offset, end, lifetime)
    offsets = []
    for life in lifetimes:
        size = -(-life.nbytes // ALIGNMENT) * ALIGNMENT
        offset = 0
        for start, end, _ in sorted(p for p in placed if p[2].birth <= life.death and life.birth <= p[2].death):
            if offset + size <= start:
                break
            offset = max(offset, end)
        placed.append((offset, offset + size, life))
        offsets.append(offset)
    return offsets, max((end for _, end, _ in placed), default=0)
