"""Many threads, one Pipeline: every request's result equals the same request made alone, in every mode.

Each mode's pipeline first serves every distinct request alone (the reference), then 8 threads send 50 requests each,
drawn from the same mixed set (batch sizes that pad and chunk, seeds, labels, step counts, deterministic and
stochastic samplers, guided and unguided) in different orders. Same pipeline and mode, same bucket: the results
must be bitwise equal. The CPU modes run in CI; graph / step carry the `cuda` marker.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict

import pytest
import torch

from blitzdiff.engine import solvers
from blitzdiff.engine.config import resolve
from blitzdiff.engine.solvers import build_plan, builder

from .test_runtime import run, tiny_pipeline

THREADS, PER_THREAD = 8, 50
SAMPLERS = ("dpmpp_2m", "euler_ancestral", "ddim", "heun", "dpmpp_2m_sde")


def mixed_requests(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        n = rng.choice((1, 2, 3, 5))
        requests.append({"n": n, "seeds": [rng.randrange(2**31) for _ in range(n)],
                         "class_labels": [rng.randrange(5) for _ in range(n)], "steps": rng.choice((2, 3, 4)),
                         "sampler": rng.choice(SAMPLERS), "guidance_scale": rng.choice((1.0, 1.5, 3.0))})
    return requests


def hammer(pipe, requests: list[dict]) -> list[tuple[int, float]]:
    """Alone first, then THREADS threads x PER_THREAD requests; returns (request index, max abs difference) for
    every concurrent result that differs from the request's solo result."""
    solo = [run(pipe, **request) for request in requests]
    failures: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(worker_id: int) -> None:
        order = random.Random(worker_id).choices(range(len(requests)), k=PER_THREAD)
        start.wait()
        try:
            for i in order:
                out = run(pipe, **requests[i])
                if not torch.equal(out, solo[i]):
                    failures.append((i, (out - solo[i]).abs().max().item()))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return failures


def check_mode(mode: str | None, device: str = "cpu", **options) -> None:
    pipe = tiny_pipeline(device=device)
    if mode is not None:  # None: the plain pipeline, no compile()
        pipe.compile(mode, **options)
    failures = hammer(pipe, mixed_requests(24))
    assert not failures, f"{len(failures)} of {THREADS * PER_THREAD} results differ from solo: {failures[:5]}"
    if mode is not None:
        stats = pipe.runtime_stats()
        assert sum(e["hits"] for e in stats["entries"]) > 0


@pytest.mark.parametrize("mode", [None, "eager"])
def test_threads_plain_and_eager(mode):
    check_mode(mode, buckets=(1, 2, 4))


def test_threads_compile():
    # One bucket size keeps torch.compile to two network shapes (unguided 4, guided 8); n = 5 chunks as 4 + 1.
    check_mode("compile", buckets=(4,))


def test_threads_with_a_small_cache_that_evicts():
    # max_graphs=2 with ~20 keys: entries are evicted while other threads are still running them.
    pipe = tiny_pipeline().compile("eager", buckets=(1, 2, 4), max_graphs=2)
    assert not hammer(pipe, mixed_requests(24, seed=1))
    assert pipe.runtime_stats()["evictions"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["graph", "step"])
def test_threads_cuda_graphs(mode):
    check_mode(mode, device="cuda", buckets=(1, 2, 4))


class PausingLookups(OrderedDict):
    """The plan LRU, with a pause after the first lookup of `key` (build_plan's `get`): the window in which another
    thread may evict that key before it is moved to the end, made long enough that it does."""

    def __init__(self, key):
        super().__init__()
        self.key, self.checked = key, threading.Event()

    def get(self, key, default=None):
        found = super().get(key, default)
        if key == self.key and not self.checked.is_set():
            self.checked.set()
            time.sleep(0.05)
        return found


def test_plan_cache_lookup_and_eviction_in_two_threads(monkeypatch):
    # The cache is full (64 plans) and steps=1 is its oldest entry. Thread A looks steps=1 up; while it is between
    # finding the key and moving it to the end, thread B builds a 65th plan, which evicts the oldest. Without the
    # cache's lock B evicts steps=1 under A (KeyError); with it B waits and evicts steps=2.
    config = resolve("ddim", {})
    build = builder(config.class_name)
    key = (config.key, 1, ())  # build_plan's cache key: ((class, fields), steps, options)
    cache = PausingLookups(key)
    monkeypatch.setattr(solvers, "_plans", cache)
    for steps in range(1, 65):
        cache[(config.key, steps, ())] = build(config, steps)
    errors: list[BaseException] = []

    def look_up() -> None:
        try:
            assert build_plan(config, 1) == build(config, 1)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    first = threading.Thread(target=look_up)
    first.start()
    assert cache.checked.wait(5)
    build_plan(config, 65)
    first.join()
    assert not errors, repr(errors[0])
    assert key in dict(cache) and len(cache) == 64
