"""Pipeline.batcher: coalesced requests get exactly their own rows, bitwise equal to the same request run alone in the
same bucket (whatever its batch-mates), and within float tolerance of a plain pipe.sample; backpressure, cancellation,
close, bad input refused at submit, and a failing request isolated from its batch-mates."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import blitzdiff
from blitzdiff.engine.network import NonFiniteOutput
from blitzdiff.serving import Batcher, BatcherClosed, QueueFull

from ..engine.test_runtime import SCHEDULER, relative, tiny_model

BUCKET = 4
REQUESTS = [  # n, seeds, labels, guidance: guided requests with different scales share a batch
    (1, 3, [2], 2.0),
    (2, [10, 11], [0, 4], [1.5, 3.0]),
    (1, 40, [1], 4.0),
    (3, 50, [3, 3, 3], 2.0),  # does not fit with the first three (4 rows): the next batch
    (1, 7, [2], 1.0),  # unguided: another key
]


def pipeline() -> blitzdiff.Pipeline:
    return blitzdiff.Pipeline(tiny_model(), SCHEDULER, name="tiny")


def ask(batcher: Batcher, request, **kwargs):
    n, seeds, labels, scale = request
    return batcher.submit(n, steps=3, sampler="dpmpp_2m", seeds=seeds, class_labels=labels, guidance_scale=scale,
                          output_type="raw", **kwargs)


def alone(request) -> torch.Tensor:
    """The request through its own batcher, nothing else queued: the bitwise reference."""
    with pipeline().batcher(max_batch=BUCKET, max_wait_ms=0) as batcher:
        return ask(batcher, request).result(timeout=60)


def test_coalesced_requests_get_their_own_rows_bitwise():
    batches = []
    with pipeline().batcher(max_batch=BUCKET, max_wait_ms=500, on_batch=batches.append) as batcher:
        futures = [ask(batcher, r) for r in REQUESTS]
        results = [f.result(timeout=60) for f in futures]
    assert sorted((b.rows, b.requests) for b in batches) == [(1, 1), (3, 1), (4, 3)]  # coalesced by key and room
    assert all(b.bucket == BUCKET and b.seconds > 0 for b in batches)
    plain = pipeline()
    for request, got in zip(REQUESTS, results, strict=True):
        n, seeds, labels, scale = request
        assert got.shape == (n, 2, 8, 8)
        assert torch.equal(got, alone(request)), request  # batch-mates change nothing
        direct = plain.sample(n, steps=3, sampler="dpmpp_2m", seeds=seeds, class_labels=labels, guidance_scale=scale,
                              output_type="raw", progress=False)
        assert relative(got, direct) < 1e-5, request  # another batch size: float tolerance (measured ~1e-7)


def test_threads_and_asyncio_submit_concurrently():
    with pipeline().batcher(max_batch=BUCKET, max_wait_ms=20) as batcher:
        out: dict[int, torch.Tensor] = {}

        def worker(i):
            out[i] = ask(batcher, REQUESTS[i % 3]).result(timeout=60)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        async def many():
            n, seeds, labels, scale = REQUESTS[1]
            return await asyncio.gather(*[batcher.submit_async(n, steps=3, sampler="dpmpp_2m", seeds=seeds,
                                                               class_labels=labels, guidance_scale=scale,
                                                               output_type="raw") for _ in range(3)])

        gathered = asyncio.run(many())
    reference = [alone(r) for r in REQUESTS[:3]]
    assert all(torch.equal(out[i], reference[i % 3]) for i in range(9))
    assert all(torch.equal(g, reference[1]) for g in gathered)


def test_outputs_are_what_sample_returns():
    with pipeline().batcher(max_batch=BUCKET) as batcher:
        tensor = batcher.submit(2, steps=2, seeds=0, class_labels=[1, 2], output_type="tensor").result(timeout=60)
        array = batcher.submit(2, steps=2, seeds=0, class_labels=[1, 2], output_type="numpy").result(timeout=60)
    expected = pipeline().sample(2, steps=2, seeds=0, class_labels=[1, 2], output_type="tensor", progress=False)
    assert tensor.shape == expected.shape and relative(tensor, expected) < 1e-5
    assert array.shape == (2, 8, 8, 2) and abs(array - expected.permute(0, 2, 3, 1).numpy()).max() < 1e-5


class Gate:
    """Holds the batcher's worker inside its first pipeline call until released."""

    def __init__(self, batcher: Batcher):
        self.entered, self.release, real = threading.Event(), threading.Event(), batcher._sample

        def held(batch):
            self.entered.set()
            self.release.wait(60)
            return real(batch)

        batcher._sample = held


def test_a_full_queue_refuses_and_close_cancels_or_drains():
    batcher = pipeline().batcher(max_batch=BUCKET, max_wait_ms=0, max_queue=2)
    gate = Gate(batcher)
    running = ask(batcher, REQUESTS[0])
    assert gate.entered.wait(30)  # the worker holds the first request; the queue is empty again
    queued = [ask(batcher, REQUESTS[4]), ask(batcher, REQUESTS[2])]
    with pytest.raises(QueueFull, match=r"2 requests are queued \(max_queue=2\); retry later"):
        ask(batcher, REQUESTS[1])
    assert queued[1].cancel() and batcher.queue_depth == 2  # a cancelled request stays queued until dropped
    gate.release.set()
    batcher.close(drain=True, timeout=60)
    assert torch.equal(running.result(), alone(REQUESTS[0])) and torch.equal(queued[0].result(), alone(REQUESTS[4]))
    assert queued[1].cancelled()
    with pytest.raises(BatcherClosed):
        ask(batcher, REQUESTS[0])

    batcher = pipeline().batcher(max_batch=BUCKET, max_wait_ms=0)
    gate = Gate(batcher)
    running = ask(batcher, REQUESTS[0])
    assert gate.entered.wait(30)
    waiting = ask(batcher, REQUESTS[2])
    gate.release.set()
    batcher.close(drain=False, timeout=60)  # cancels what waits; the running batch finishes
    assert waiting.cancelled() and torch.equal(running.result(), alone(REQUESTS[0]))


class NaNForLabel(torch.nn.Module):
    """Wraps a model: rows conditioned on class `bad` come out NaN."""

    def __init__(self, inner: torch.nn.Module, bad: int):
        super().__init__()
        self.inner, self.config, self.diffusers_class, self.bad = inner, inner.config, inner.diffusers_class, bad

    def forward(self, x, t, class_labels):
        rows = (class_labels == self.bad).reshape(-1, *[1] * (x.dim() - 1))
        return self.inner(x, t, class_labels=class_labels).masked_fill(rows, float("nan"))


def test_a_failing_request_fails_only_its_own_future():
    pipe = blitzdiff.Pipeline(NaNForLabel(tiny_model(), bad=3), SCHEDULER)
    batches = []
    with pipe.batcher(max_batch=BUCKET, max_wait_ms=500, on_batch=batches.append) as batcher:
        good = [ask(batcher, REQUESTS[0]), ask(batcher, REQUESTS[2])]
        bad = ask(batcher, (1, 5, [3], 2.0))
        with pytest.raises(NonFiniteOutput, match="NaN or Inf"):
            bad.result(timeout=60)
        results = [f.result(timeout=60) for f in good]
    assert torch.equal(results[0], alone(REQUESTS[0])) and torch.equal(results[1], alone(REQUESTS[2]))
    assert batches == []  # the shared batch failed; each request then ran alone (the hook reports whole batches)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 5}, r"n must be an int in 1..4 \(the batcher's max_batch\), got 5"),
    ({"noise": torch.zeros(1)}, "unknown request field.s. noise; allowed: steps, sampler"),
    ({"steps": None}, "steps"),
    ({"class_labels": [9]}, r"class_labels must be an int or 1 ints in 0..4"),
    ({"guidance_scale": [1.5, 2.0]}, r"guidance_scale must be a finite number or 1 of them"),
    ({"sampler": "fast"}, "unknown sampler 'fast'"),
    ({"output_type": "jpg"}, "unknown output_type 'jpg'"),
    ({"seeds": -1}, "seeds"),
])
def test_bad_requests_are_refused_at_submit(kwargs, message):
    with pipeline().batcher(max_batch=BUCKET) as batcher:
        request = {"n": 1, "steps": 2, "class_labels": [1], **kwargs}
        if request["steps"] is None:
            del request["steps"]
        with pytest.raises(ValueError, match=message):
            batcher.submit(**request)
        assert batcher.queue_depth == 0


def test_construction_checks():
    with pytest.raises(ValueError, match=r"a batcher needs one fixed bucket.*compile it with buckets=\(4,\)"):
        pipeline().compile("eager", buckets=(1, 2, 4)).batcher(max_batch=4)
    with pytest.raises(ValueError, match="bucket must be an int >= max_batch=8, got 4"):
        pipeline().batcher(max_batch=8, bucket=4)
    with pytest.raises(ValueError, match="max_queue must be an int >= 1, got 0"):
        pipeline().batcher(max_queue=0)
    pipe = pipeline().compile("eager", buckets=(8,))
    with pipe.batcher(max_batch=4) as batcher:  # the pipeline's one bucket
        assert batcher.bucket == 8


def test_a_request_that_waited_behind_a_batch_does_not_wait_again():
    # max_wait counts from submit(): B, queued while A's batch ran for longer than max_wait, runs right after A
    with pipeline().batcher(max_batch=BUCKET, max_wait_ms=2000) as batcher:
        gate = Gate(batcher)
        first = ask(batcher, REQUESTS[0])  # waits its 2 s for batch-mates, then holds the worker at the gate
        assert gate.entered.wait(30)
        second = ask(batcher, REQUESTS[4])  # another key: its own batch
        time.sleep(2.2)  # longer than max_wait
        released = time.monotonic()
        gate.release.set()
        first.result(timeout=60)
        second.result(timeout=60)
        assert time.monotonic() - released < 1.0  # not another 2 s of waiting
