"""CUDA graph capture of the sampling loop (ARCHITECTURE.md contracts 3 and 6). Depends on torch.cuda only.

The loop never syncs with the host, so its whole N-step run (network calls, guidance, solver updates, per-sample
noise) can be recorded once and replayed. The graphs of a pipeline record into one memory pool (a new one once all
of them are gone, see Pool): they are replayed one at a time on one stream, so the intermediate memory of one
capture is reused by the next. A graph reads
its inputs from, and writes its outputs to, fixed addresses: callers copy new inputs into those static tensors and
read (or clone) the outputs after `replay`.
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream that warm-ups and captures on `device` run on, made on first use. cuBLAS keeps a workspace
    per stream for the life of the process (32 MiB on Hopper), so a new stream per capture grew the allocated memory
    by ~35 MB at each recapture (seen on an H200 with torch 2.11); warming up on the capture's stream also leaves
    the capture nothing to initialize."""
    return _side_stream(device.index if device.index is not None else torch.cuda.current_device())


def warm_up(body: Callable[[], Any], device: torch.device) -> None:
    """Run `body` once on the capture stream: lazy initialization (cuBLAS / cuDNN handles and workspaces, Triton
    compilation, kernel selection) must not happen during capture (torch.cuda.graphs documents the warm-up)."""
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


class Pool:
    """The memory pool a pipeline's captures share, while a graph captured into it lives. When its last graph is gone
    the caching allocator stops sharing the pool but keeps it while tensors allocated in it survive (a dropped
    entry's leftovers), and a capture into it then fails an internal assert (`use_count > 0`, seen on an H200 with
    torch 2.11 once evicted entries were recaptured): a capture after the last graph is gone starts a new pool."""

    def __init__(self) -> None:
        self.handle: Any = None  # torch.cuda.graph_pool_handle(), made by the first capture
        self.graphs: weakref.WeakSet = weakref.WeakSet()  # the live graphs captured into `handle`

    def for_capture(self) -> Any:
        """The handle for the next capture (call after gc.collect(), so that dead graphs are gone)."""
        if not self.graphs:
            self.handle = torch.cuda.graph_pool_handle()
        return self.handle


def capture(parts: Sequence[Callable[[], Any]], pool: Pool, device: torch.device) -> tuple[list[torch.cuda.CUDAGraph],
                                                                                      list[Any], int]:
    """Record each callable of `parts` into its own graph, in order, all in `pool`; the tensors one part leaves
    behind (static, in the pool) are what the next part reads, so replaying the graphs in the same order repeats
    the whole computation. Returns (graphs, each part's return value, bytes the capture reserved).

    The garbage collector runs first and is off during the capture: a dead cycle holding an old graph (an evicted
    entry, a dropped pipeline), collected while a stream captures, would reset that graph, which CUDA forbids then,
    and the capture would fail (seen on an H200 with torch 2.11, whose torch.cuda.graph no longer collects). The
    capture's error mode is thread_local, so CUDA calls of other threads (another pipeline's eager loop, a caller
    comparing results) cannot invalidate it. torch.cuda.graph empties the allocator's cache on entry; the reserved
    bytes are measured from an emptied cache too, so they count what the capture kept."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    handle = pool.for_capture()
    reserved = torch.cuda.memory_reserved(device)
    graphs, results = [], []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for part in parts:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=handle, stream=side_stream(device), capture_error_mode="thread_local"):
                results.append(part())
            graphs.append(graph)
            pool.graphs.add(graph)
    finally:
        if collecting:
            gc.enable()
    torch.cuda.synchronize(device)
    return graphs, results, torch.cuda.memory_reserved(device) - reserved
