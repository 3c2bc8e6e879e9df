"""Measuring one benchmark configuration, and the record of where it was measured.

`measure(run, device, repeats)`: the first call is timed on its own (it pays any build: graph capture,
compilation, allocator growth), then one untimed warm-up call during which peak memory is measured (so the memory
probe never perturbs a timing), then `repeats` timed calls. Every timed call is wall time with the device
synchronized before and after it, so queued GPU work is counted in the call that queued it.

The repeats' spread is part of the figure: min, quartiles, median, max, the relative interquartile range
(q75 - q25) / median and the slowest over the fastest repeat. A configuration whose repeats disagree by more than
UNSTABLE_REL_IQR or UNSTABLE_MAX_OVER_MIN is unstable: its median says little (another process, frequency scaling,
a GC pause took part), and `blitzdiff bench` says so after its tables.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..malloc import malloc_record, release_free_heap

# A configuration is unstable when its relative IQR exceeds UNSTABLE_REL_IQR or its slowest repeat is more than
# UNSTABLE_MAX_OVER_MIN times its fastest (a steady CPU or GPU run stays within a few %).
UNSTABLE_REL_IQR = 0.10
UNSTABLE_MAX_OVER_MIN = 1.5
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
# How peak memory is measured (meta.memory): peak_total_bytes is the peak, peak_memory_bytes its rise above the
# memory in use just before the measured call.
MEMORY_METHODS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, not "
                                 "the caching allocator's reserve); the rise excludes weights and live inputs",
    "rss_hwm_reset": "the process's peak RSS (VmHWM), reset through /proc/self/clear_refs before the call, after "
                     "malloc_trim hands malloc's free pages back (glibc); the peak includes whatever the process "
                     "holds, and memory held between calls (a runtime's buffers, oneDNN's caches) is not re-counted",
    "ru_maxrss_delta": "getrusage's ru_maxrss, never reset: its rise over the call is a lower bound (0 when an "
                       "earlier peak of the process was higher)",
}


@dataclass(frozen=True)
class Measurement:
    """One configuration's timings (ms) and peak memory (bytes above what was in use before the warm-up call;
    peak_total_bytes: the absolute peak, CUDA allocated bytes or process RSS)."""

    first_call_ms: float
    times_ms: tuple[float, ...]
    peak_memory_bytes: int
    peak_total_bytes: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def spread(self) -> dict[str, float]:
        """min_ms, q25_ms, median_ms, q75_ms, max_ms of the repeats (quartiles interpolated linearly between the
        sorted times, numpy's default; one repeat: all equal), rel_iqr = (q75 - q25) / median, max_over_min."""
        times = sorted(self.times_ms)
        q25, _, q75 = quartiles(times)
        median = self.median_ms
        return {"min_ms": times[0], "q25_ms": q25, "median_ms": median, "q75_ms": q75, "max_ms": times[-1],
                "rel_iqr": (q75 - q25) / median, "max_over_min": times[-1] / times[0]}

    @property
    def unstable(self) -> bool:
        """The repeats disagree beyond UNSTABLE_REL_IQR or UNSTABLE_MAX_OVER_MIN."""
        spread = self.spread()
        return spread["rel_iqr"] > UNSTABLE_REL_IQR or spread["max_over_min"] > UNSTABLE_MAX_OVER_MIN

    @property
    def build_s(self) -> float:
        """What the first call cost beyond a steady-state call: graph capture / compilation / first-use setup."""
        return max(self.first_call_ms - self.median_ms, 0.0) / 1e3


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of `values`, interpolated linearly between the sorted values (numpy's default); one value:
    all three equal it."""
    ordered = sorted(values)
    q25, median, q75 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return q25, median, q75


def error_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a failed system's record)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(run: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of one call of `run`, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(run: Callable[[], Any], device: torch.device, repeats: int) -> Measurement:
    """Time `run` on `device`: first call (build), one untimed warm-up (peak memory), then the median of `repeats`."""
    first = timed_ms(run, device)
    probe = PeakMemory(device)
    with probe:
        run()
        synchronize(device)
    times = tuple(timed_ms(run, device) for _ in range(repeats))
    return Measurement(first, times, probe.peak_bytes, probe.peak_total_bytes)


def memory_method(device: torch.device) -> str:
    """How PeakMemory measures on `device`: a key of MEMORY_METHODS."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "rss_hwm_reset" if _can_reset_peak_rss() else "ru_maxrss_delta"


class PeakMemory:
    """Context manager: peak memory of the enclosed code, by memory_method(device) (see MEMORY_METHODS).

    On CPU the process's peak RSS is monotonic, so it is reset first where Linux allows (writing 5 to
    /proc/self/clear_refs resets VmHWM); elsewhere the growth of ru_maxrss is the best available figure. Before the
    reset, malloc's free pages go back to the kernel: a call that reuses freed heap memory (kept resident by glibc
    after earlier calls) would otherwise raise no RSS at all."""

    def __init__(self, device: torch.device):
        self.device, self.method = device, memory_method(device)
        self.peak_bytes = self.peak_total_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_hwm_reset":
            release_free_heap()
            PROC_CLEAR_REFS.write_text("5")
            self._before = _proc_status_bytes("VmRSS")
        else:
            self._before = _max_rss_bytes()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.method == "cuda_max_memory_allocated":
            self.peak_total_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_hwm_reset":
            self.peak_total_bytes = _proc_status_bytes("VmHWM")
        else:
            self.peak_total_bytes = _max_rss_bytes()
        self.peak_bytes = max(self.peak_total_bytes - self._before, 0)


@cache
def _can_reset_peak_rss() -> bool:
    try:
        PROC_CLEAR_REFS.write_text("5")
        _proc_status_bytes("VmHWM")
    except (OSError, ValueError):
        return False
    return True


def _proc_status_bytes(field: str) -> int:
    """A "kB" field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in {PROC_STATUS}")


def _max_rss_bytes() -> int:
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def device_record(device: torch.device) -> dict[str, Any]:
    """The device a figure was measured on: the GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": properties.name, "memory_bytes": properties.total_memory,
                "cuda": torch.version.cuda}
    return {"type": device.type, "name": _cpu_model(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine()}


def device_label(record: dict[str, Any]) -> str:
    """A device_record as one phrase: "NVIDIA H100 80GB HBM3", "AMD EPYC, 1 torch thread"."""
    threads = record.get("torch_threads")
    if threads is None:
        return record["name"]
    return f"{record['name']}, {threads} torch thread{'s' if threads != 1 else ''}"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def versions() -> dict[str, str | None]:
    """Installed versions of what a figure depends on (None: not installed), read without importing them."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "triton", "blitzdiff"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_record(device: torch.device) -> dict[str, Any]:
    """The exact command line, the date (UTC), the device, the versions and the malloc settings (blitzdiff.malloc):
    what every result file carries."""
    return {"command": list(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_record(device), "versions": versions(),
            "memory": {"method": memory_method(device), "meaning": MEMORY_METHODS[memory_method(device)]},
            "malloc": malloc_record()}
