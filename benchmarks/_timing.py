"""Timing helpers shared by the benchmarks: warm-up, batches of calls long enough to time, synchronization, medians,
the name of the device a figure was measured on, and `blitzdiff bench`'s thread rule for the scripts."""

import platform
import statistics
import time
from contextlib import contextmanager

import torch

from blitzdiff.bench import CpuThreads, format_warnings

QUICK_HELP = "smoke run: tiny sizes, few repeats, no torch.compile rows (benchmarks/test_scripts.py runs it)"


@contextmanager
def cpu_threads(requested: int | None):
    """Run the body with torch's thread count by `blitzdiff bench`'s rule (blitzdiff.bench.threads), or `requested`;
    prints the count first and, after the body, a warning block when the CPU was oversubscribed."""
    with CpuThreads(requested) as threads:
        print(threads.describe())
        yield threads
    if threads.warnings():
        print(format_warnings(threads.warnings()))


def median_us(run, repeats: int, inner: int | None = None) -> float:
    """Median over `repeats` of the mean microseconds per call of `run`, each timed over `inner` calls.

    inner=None sizes the batch to about 2 ms per timing. Warm-up runs first (allocator caches, first-call dispatch,
    lazy import of blitzdiff._C, compilation).
    """
    for _ in range(3 if inner is None else 10 * inner):
        run()
    if inner is None:
        start = time.perf_counter()
        run()
        inner = max(1, round(2e-3 / (time.perf_counter() - start)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            run()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times) * 1e6


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `repeats` calls of `run`, after one warm-up call (which also fills caches)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_us(run, device: torch.device, repeats: int, cuda_inner: int = 20) -> float:
    """Median microseconds per call of `run` on `device`. CPU: median_us (batches of about 2 ms). CUDA: 10 warm-up
    calls, then `cuda_inner` calls captured into one CUDA graph, and CUDA events around each of `repeats` replays:
    the figure is the kernels' GPU time, without the host's launch cost (which exceeds a small kernel's run time).
    A call that cannot be captured is timed the same way without the graph (launches queued back to back)."""
    if device.type != "cuda":
        return median_us(run, repeats)
    for _ in range(10):
        run()
    torch.cuda.synchronize(device)
    block = _graphed(run, cuda_inner, device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        block()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / cuda_inner)
    return statistics.median(times)


def _graphed(run, calls: int, device: torch.device):
    """A zero-argument callable doing `calls` calls of `run`: one CUDA graph replay, else (capture refused) a loop."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                run()
    except RuntimeError as error:
        print(f"  (not capturable, timed without a graph: {str(error).splitlines()[0]})")
        torch.cuda.synchronize(device)
        return lambda: [run() for _ in range(calls)]
    return graph.replay


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's CPU thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:  # not Linux
        names = []
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads"
