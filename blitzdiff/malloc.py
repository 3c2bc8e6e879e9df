"""glibc malloc settings for a process that samples on the CPU.

PyTorch's CPU tensors come from malloc. With glibc's defaults a block above the mmap threshold (128 KiB at first,
then raised to the largest block freed so far) is mmap'd and unmapped again on free, and free memory at the top of
the heap beyond the trim threshold (twice the mmap threshold) goes back to the kernel. A sampling loop frees and
allocates the same activations at every step, so its tensors can arrive as fresh zero-filled pages at every step:
page faults (a step of three 4 MiB tensors: ~3000 with the starting threshold held, ~3000 or none with the adjusting
defaults, by the heap's layout at start; none once tuned: tests/test_malloc.py). `tune_malloc()` sets both
thresholds (mallopt), which also stops glibc's adjusting them: blocks up to 32 MiB come from the heap and freed
memory stays with the process for the next step. The cost: the process keeps its peak heap instead of handing
freed pages back (malloc_trim(0) still does), as a caching allocator would. Measured in fresh processes
(benchmarks/bench_cpu_default_path.py, README "CPU: the default path"). Process-wide, so never applied on import: the
CLI and the first sampling run of a CPU Pipeline apply it (tune_malloc_once), unless BLITZDIFF_MALLOC=system.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import cache
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30
# glibc's own environment settings of the same thresholds: a process started with them keeps them
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "BLITZDIFF_MALLOC"  # =system: malloc is left as it is; =tuned (or unset, or empty): the default
OPT_OUT_VALUES = ("tuned", "system")

_applied: dict[str, Any] = {"tuned": False, "reason": "tune_malloc() not called"}
_attempted = False  # tune_malloc_once ran
_once = threading.Lock()  # a server's threads may sample at once


@cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and malloc_trim do something there), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no dlopen of the process itself (not a Unix)
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is a stub, if present
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def tune_malloc() -> dict[str, Any]:
    """Raise glibc's mmap and trim thresholds (module docstring) for the whole process; returns malloc_record().
    Does nothing where the C library is not glibc, or when the process was started with glibc's own
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (the user's choice stands). Safe to call again."""
    global _applied
    libc = glibc()
    chosen = [name for name in GLIBC_VARIABLES if name in os.environ]
    if libc is None:
        _applied = {"tuned": False, "reason": "the C library is not glibc"}
    elif chosen:
        _applied = {"tuned": False, "reason": f"set by the environment ({', '.join(chosen)})"}
    elif libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        _applied = {"tuned": True, "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    else:
        _applied = {"tuned": False, "reason": "mallopt refused the thresholds"}
    return malloc_record()


def tune_malloc_once() -> None:
    """tune_malloc() the first time this is called in the process, unless the environment says BLITZDIFF_MALLOC=system
    (then malloc_record() says so): what the CLI and a CPU Pipeline's sampling call. Another value of it is a
    ValueError (every call until it is fixed), not silently the default."""
    global _applied, _attempted
    if _attempted:  # every later sampling run: one read, no lock
        return
    with _once:
        if _attempted:
            return
        choice = os.environ.get(OPT_OUT) or "tuned"
        if choice not in OPT_OUT_VALUES:
            raise ValueError(f"{OPT_OUT}={choice!r} is not understood; allowed: tuned (the default: blitzdiff sets "
                             "malloc's thresholds), system (malloc is left as it is)")
        if choice == "system":
            _applied = {"tuned": False, "reason": f"{OPT_OUT}=system"}
        else:
            tune_malloc()
        _attempted = True


def malloc_record() -> dict[str, Any]:
    """What this process's malloc runs with, as far as blitzdiff set it: {"tuned": True, "mmap_threshold",
    "trim_threshold"} or {"tuned": False, "reason"} (benchmarks record it)."""
    return dict(_applied)


def release_free_heap() -> None:
    """glibc's malloc_trim(0): hand every arena's free pages back to the kernel (a no-op without glibc)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
