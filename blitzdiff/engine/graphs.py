"""CUDA graph capture of the sampling loop (ARCHITECTURE.md contracts 3 and 6). Depends on torch.cuda only.

The loop never syncs with the host, so its whole N-step run (network calls, guidance, solver updates, per-sample
noise) can be recorded once and replayed. Every graph of a pipeline records into one memory pool: the graphs are
replayed one at a time on one stream, so the intermediate memory of one capture is reused by the next. A graph reads
its inputs from, and writes its outputs to, fixed addresses: callers copy new inputs into those static tensors and
read (or clone) the outputs after `replay`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def warm_up(body: Callable[[], Any], device: torch.device) -> None:
    """Run `body` once on a side stream: lazy initialization (cuBLAS / cuDNN handles, Triton compilation, kernel
    selection) must not happen during capture (torch.cuda.graphs documents the warm-up)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


def capture(parts: Sequence[Callable[[], Any]], pool: Any, device: torch.device) -> tuple[list[torch.cuda.CUDAGraph],
                                                                                     list[Any], int]:
    """Record each callable of `parts` into its own graph, in order, all in `pool`; the tensors one part leaves
    behind (static, in the pool) are what the next part reads, so replaying the graphs in the same order repeats
    the whole computation. Returns (graphs, each part's return value, bytes the capture reserved)."""
    torch.cuda.synchronize(device)
    reserved = torch.cuda.memory_reserved(device)
    graphs, results = [], []
    for part in parts:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            results.append(part())
        graphs.append(graph)
    torch.cuda.synchronize(device)
    return graphs, results, torch.cuda.memory_reserved(device) - reserved


def new_pool() -> Any:
    """A memory pool handle for captures to share."""
    return torch.cuda.graph_pool_handle()
