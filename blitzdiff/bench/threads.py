"""How many CPU threads a measured run uses, and the machine's load around it (`blitzdiff bench`, `blitzdiff
profile`, the scripts in benchmarks/).

torch's default thread count is the machine's physical cores, whatever else runs there: on a loaded machine that
oversubscribes the CPU and a timing measures the scheduler's time slicing instead of the code (on a 2-core machine
running another job, torch's 2 threads made an 8-step batch-1 run take 15 s and its repeats range over 4x; one
thread gave sane figures). So a run takes the cores the others leave (THREAD_RULE), and says so when the machine
was oversubscribed all the same (CpuThreads.warnings).

The load is the 1-minute load average (os.getloadavg: runnable and waiting threads, an exponential average with a
60 s time constant). After a run it includes the run itself: the others' share is estimated by taking out this
process's own contribution, its average busy threads p (CPU time / wall time over the run; the CPU time of the child
processes it waited for counts as its own: a script that times fresh processes) weighted as the average weights the
last T seconds: others = load_after - p * (1 - exp(-T / 60)). The load before a run counts every busy
thread, this process's own earlier work included (a Python session that has just run something else).
"""

from __future__ import annotations

import math
import os
from time import perf_counter, process_time
from typing import Any

import torch

THREAD_RULE = ("threads = usable cores - the 1-minute load average before the run rounded (halves up), at least 1, "
               "at most torch's default (its physical-core count, or OMP_NUM_THREADS)")
LOAD_TIME_CONSTANT_S = 60.0  # of the 1-minute load average


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of the child processes it has waited for."""
    times = os.times()
    return process_time() + times.children_user + times.children_system


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def busy_cores(load: float) -> int:
    """The cores a load average keeps busy: rounded to the nearest, halves up (1.5 -> 2, 2.5 -> 3)."""
    return math.floor(load + 0.5)


def rule_threads(cores: int, load: float | None, torch_default: int) -> int:
    """THREAD_RULE: the cores the other work leaves, between 1 and torch's default (load None: counted as 0)."""
    return max(1, min(torch_default, cores - busy_cores(load or 0.0)))


class CpuThreads:
    """Context manager for one measured run: torch's intra-op thread count set to `requested`, or by THREAD_RULE when
    None, and restored at the end; the load average read before and after. record() and warnings() after the run.

    ValueError at construction for a count that is not an int >= 1."""

    def __init__(self, requested: int | None = None):
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise ValueError(f"threads must be an int >= 1 (or None: the rule), got {requested!r}")
        self.requested = requested
        self.load_after: float | None = None
        self.own_threads = self.wall_s = 0.0

    def __enter__(self) -> CpuThreads:
        self.torch_default, self.cores, self.load_before = torch.get_num_threads(), usable_cores(), load_average()
        self.count = self.requested or rule_threads(self.cores, self.load_before, self.torch_default)
        torch.set_num_threads(self.count)
        self._start = perf_counter(), own_cpu_seconds()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall_s = perf_counter() - self._start[0]
        self.own_threads = (own_cpu_seconds() - self._start[1]) / self.wall_s if self.wall_s > 0 else 0.0
        self.load_after = load_average()
        torch.set_num_threads(self.torch_default)

    def others_load_after(self) -> float | None:
        """The others' load average at the end (see the module docstring), None where there is no load average."""
        if self.load_after is None:
            return None
        own = self.own_threads * (1 - math.exp(-self.wall_s / LOAD_TIME_CONSTANT_S))
        return max(self.load_after - own, 0.0)

    def describe(self) -> str:
        """One line: the count, why, the cores and the load."""
        why = "as requested" if self.requested else "by the rule: usable cores - rounded load, 1 to torch's default"
        load = "unknown" if self.load_before is None else f"{self.load_before:.2f}"
        return (f"torch threads: {self.count} ({why}); {self.cores} usable cores, load average {load}, torch's "
                f"default {self.torch_default}")

    def warnings(self) -> list[str]:
        """The run competed for the CPU: the others' busy cores plus this run's threads exceeded the usable
        cores, before the run or during it (see the module docstring). Empty when not, or when there is no load."""
        loads = {when: load for when, load in (("before", self.load_before), ("during", self.others_load_after()))
                 if load is not None and busy_cores(load) + self.count > self.cores}
        if not loads:
            return []
        busy = " and ".join(f"{load:.2f} {when} the run" for when, load in loads.items())
        return [f"load: other work kept cores busy, about {busy} (1-minute load average), while this run used "
                f"{self.count} torch thread{'s' if self.count != 1 else ''} on {self.cores} usable cores: the CPU "
                "was oversubscribed, so the times include waiting for it (rerun on an idle machine, or with fewer "
                "--threads)"]

    def record(self) -> dict[str, Any]:
        """What a result file keeps: the count, the rule (or "requested"), the cores, the load before / after."""
        return {"count": self.count, "requested": self.requested,
                "rule": "requested" if self.requested else THREAD_RULE, "torch_default": self.torch_default,
                "usable_cores": self.cores, "load_before": self.load_before, "load_after": self.load_after,
                "others_load_after": self.others_load_after(), "own_busy_threads": self.own_threads,
                "wall_s": self.wall_s}
