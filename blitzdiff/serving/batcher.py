"""Dynamic batching for a Pipeline: concurrent requests coalesced into bucket runs, each request's rows bitwise
independent of its batch-mates.

Requests with the same key (steps, sampler, eta, guided or not, image size, conditioning layout) wait up to
`max_wait_ms` for each other and run as one `Pipeline.sample` of at most `max_batch` rows, padded to the fixed
`bucket`: per-sample seeds key every row's noise, guidance scales are per row (a [B] device buffer) and the runtime's
padding never reaches a real row, so a request's rows are the same bits alone or with any batch-mates. Bad input is
refused in `submit` (a ValueError naming the field), before it is queued; a batch that fails (e.g. NonFiniteOutput)
is re-run request by request, in the same bucket, so only the failing request's future fails. A full queue refuses
new requests (QueueFull) instead of growing; `close()` drains or cancels what is queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.denoiser import is_guided
from ..engine.inputs import guidance_values, positive_int, seed_values
from ..engine.pipeline import OUTPUT_TYPES

# sample() arguments a request may carry (noise, callbacks, progress and profiling are per call, not per request)
REQUEST_FIELDS = ("steps", "sampler", "seeds", "class_labels", "guidance_scale", "eta", "height", "width",
                  "encoder_hidden_states", "negative_encoder_hidden_states", "output_type")


class QueueFull(RuntimeError):
    """The batcher's queue holds max_queue requests: retry later (a server answers 503)."""


class BatcherClosed(RuntimeError):
    """submit() after close()."""


@dataclass(frozen=True)
class BatchStats:
    """One bucket run, as the on_batch hook sees it: rows, requests, bucket size, seconds in the pipeline."""

    rows: int
    requests: int
    bucket: int
    seconds: float


@dataclass
class _Pending:
    key: tuple
    n: int
    seeds: list[int]
    labels: list[int] | None
    scales: list[float]
    embeddings: tuple[torch.Tensor | None, torch.Tensor | None]  # prompt / negative prompt [n, tokens, width]
    options: dict[str, Any]  # steps, sampler, eta, height, width
    output_type: str
    future: Future
    queued_at: float = 0.0  # time.monotonic() when submit() queued it


class Batcher:
    """Coalesces `submit`ted requests for `pipe` (see the module docs). The pipeline runs every batch in its runtime
    with the single bucket `bucket` (default max_batch): an uncompiled pipeline is compiled in "eager" mode with it;
    a compiled one must already have buckets == (bucket,). on_batch(BatchStats) runs after each bucket run (metrics).
    """

    def __init__(self, pipe: Any, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
                 bucket: int | None = None, on_batch: Callable[[BatchStats], None] | None = None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            positive_int(name, value)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int | float) or not 0 <= max_wait_ms < 60_000:
            raise ValueError(f"max_wait_ms must be a number in [0, 60000), got {max_wait_ms!r}")
        buckets = None if pipe.runtime is None else pipe.runtime.buckets
        if bucket is None:
            bucket = buckets[0] if buckets is not None and len(buckets) == 1 else max_batch
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < max_batch:
            raise ValueError(f"bucket must be an int >= max_batch={max_batch}, got {bucket!r}")
        if buckets is None:
            pipe.compile("eager", buckets=(bucket,))
        elif buckets != (bucket,):
            raise ValueError(f"the pipeline runs buckets {list(buckets)}; a batcher needs one fixed bucket, so that a "
                             f"request's rows do not depend on its batch-mates: compile it with buckets=({bucket},)")
        self.pipe, self.max_batch, self.bucket, self.max_queue = pipe, max_batch, bucket, max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="blitzdiff-batcher", daemon=True)
        self._worker.start()

    # -- the callers' side ---------------------------------------------------------------------------------------
    def submit(self, n: int = 1, **kwargs: Any) -> Future:
        """A Future of what `pipe.sample(n, **kwargs)` returns for this request (steps, sampler, seeds, class_labels,
        guidance_scale, eta, height, width, encoder_hidden_states, negative_encoder_hidden_states, output_type).
        Raises ValueError for bad input, QueueFull when max_queue requests wait, BatcherClosed after close()."""
        pending = self._checked(n, kwargs)
        with self._condition:
            if self._closed:
                raise BatcherClosed("this batcher is closed; create a new one")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (max_queue={self.max_queue}); retry later")
            pending.queued_at = time.monotonic()
            self._queue.append(pending)
            self._condition.notify()
        return pending.future

    async def submit_async(self, n: int = 1, **kwargs: Any) -> Any:
        """submit() for asyncio: awaits the request's result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(n, **kwargs))

    @property
    def queue_depth(self) -> int:
        with self._condition:
            return len(self._queue)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; drain=True runs the queued ones first, drain=False cancels them. Waits for the
        worker (at most `timeout` seconds)."""
        with self._condition:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._condition.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _checked(self, n: Any, kwargs: dict[str, Any]) -> _Pending:
        """The request validated as pipe.sample would, and its batch key; a ValueError names the bad field."""
        unknown = sorted(set(kwargs) - set(REQUEST_FIELDS))
        if unknown:
            raise ValueError(f"unknown request field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be an int in 1..{self.max_batch} (the batcher's max_batch), got {n!r}")
        if "steps" not in kwargs:
            raise ValueError("steps is required")
        pipe = self.pipe
        output_type = kwargs.get("output_type", "pil")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        options = {k: kwargs.get(k) for k in ("steps", "sampler", "eta", "height", "width")}
        pipe.evaluations(options["steps"], options["sampler"], options["eta"])  # checks steps, sampler and eta
        scale = guidance_values(pipe.default_guidance_scale if kwargs.get("guidance_scale") is None
                                else kwargs["guidance_scale"], n)
        guided = is_guided(scale)
        shape = pipe.latent_shape(options["height"], options["width"])
        cond, uncond = pipe.conditioning(n, kwargs.get("class_labels"), kwargs.get("encoder_hidden_states"),
                                         kwargs.get("negative_encoder_hidden_states"), scale)
        labels = cond["class_labels"].tolist() if "class_labels" in cond else None
        prompt = "encoder_hidden_states"
        embeddings = (cond.get(prompt), None if uncond is None else uncond.get(prompt))
        layout = tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in sorted(cond.items()))
        key = (options["steps"], options["sampler"], options["eta"], shape, guided, layout)
        scales = [scale] * n if isinstance(scale, float) else scale
        return _Pending(key, n, seed_values(kwargs.get("seeds"), n), labels, scales, embeddings, options,
                        output_type, Future())

    # -- the worker ----------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        """The oldest request and, once its max_wait since submit() is up (or its key fills max_batch rows), every
        queued request of its key that fits in max_batch rows (in arrival order); None once closed and empty."""
        with self._condition:
            while not self._queue:
                if self._closed:
                    return None
                self._condition.wait()
            head = self._queue[0]
            deadline = head.queued_at + self.max_wait  # a request that already waited behind others waits no more
            while not self._closed and self._rows(head.key) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            batch, rows, kept = [], 0, deque()
            while self._queue:
                pending = self._queue.popleft()
                if pending.key == head.key and rows + pending.n <= self.max_batch:
                    batch.append(pending)
                    rows += pending.n
                else:
                    kept.append(pending)
            self._queue = kept
        return [p for p in batch if p.future.set_running_or_notify_cancel()]  # cancelled ones drop out here

    def _rows(self, key: tuple) -> int:
        return sum(p.n for p in self._queue if p.key == key)

    def _run(self, batch: Sequence[_Pending]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        try:
            raw = self._sample(batch)
        except Exception as batch_error:  # isolate: each request again alone, in the same bucket (same bits)
            if len(batch) == 1:
                batch[0].future.set_exception(batch_error)
                return
            for pending in batch:
                self._run_alone(pending)
            return
        if self.on_batch is not None:
            self.on_batch(BatchStats(sum(p.n for p in batch), len(batch), self.bucket, time.perf_counter() - start))
        row = 0
        for pending in batch:
            self._resolve(pending, raw[row:row + pending.n])
            row += pending.n

    def _run_alone(self, pending: _Pending) -> None:
        try:
            raw = self._sample([pending])
        except Exception as error:
            pending.future.set_exception(error)
            return
        self._resolve(pending, raw)

    def _resolve(self, pending: _Pending, raw: torch.Tensor) -> None:
        try:
            pending.future.set_result(self.pipe.output(raw, pending.output_type))
        except Exception as error:
            pending.future.set_exception(error)

    def _sample(self, batch: Sequence[_Pending]) -> torch.Tensor:
        """One pipe.sample over the batch's rows (raw output [rows, ...]); conditioning concatenated in order."""
        first = batch[0]
        labels = None if first.labels is None else [label for p in batch for label in p.labels]
        embeddings = [None if first.embeddings[i] is None else torch.cat([p.embeddings[i] for p in batch])
                      for i in range(2)]
        scales = [s for p in batch for s in p.scales]
        return self.pipe.sample(sum(p.n for p in batch), **first.options, seeds=[s for p in batch for s in p.seeds],
                                class_labels=labels, guidance_scale=scales, encoder_hidden_states=embeddings[0],
                                negative_encoder_hidden_states=embeddings[1], output_type="raw", progress=False)
