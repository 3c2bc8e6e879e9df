"""Timing helpers shared by the CPU benchmarks: warm-up, batches of calls long enough to time, medians."""

import statistics
import time


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
