"""The ASGI server (blitzdiff.serving.server) on a loopback port: concurrent requests equal to direct results, every
bad field answered 4xx naming it (and the server serving on), /metrics as Prometheus text, timeouts, a full queue,
and a graceful shutdown that finishes every accepted request."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import blitzdiff
from blitzdiff.serving.server import create_app

from ..engine.test_runtime import SCHEDULER, relative, tiny_model
from .test_batcher import BUCKET


class Slow(torch.nn.Module):
    """Wraps a model; each call sleeps `seconds` first (requests that stay in flight)."""

    def __init__(self, inner: torch.nn.Module, seconds: float):
        super().__init__()
        self.inner, self.config, self.diffusers_class = inner, inner.config, inner.diffusers_class
        self.seconds = seconds

    def forward(self, x, t, **cond):
        time.sleep(self.seconds)
        return self.inner(x, t, **cond)


def pipeline(slow: float = 0.0) -> blitzdiff.Pipeline:
    model = tiny_model() if slow == 0 else Slow(tiny_model(), slow)
    return blitzdiff.Pipeline(model, SCHEDULER, name="tiny", guidance_scale=2.0)


@contextmanager
def serving(pipe, **options):
    """(base URL, uvicorn server) of the app on 127.0.0.1 and a free port, in a thread; stopped at exit."""
    app = create_app(pipe, max_batch=BUCKET, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)


def call(url: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str, dict]:
    """(status, JSON body or text, headers) of one request; 4xx / 5xx are returned, not raised."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, headers = response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as failed:
        status, text, headers = failed.code, failed.read().decode(), dict(failed.headers)
    return status, (json.loads(text) if headers.get("content-type", "").startswith("application/json") else text), \
        headers


def array(answer: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(answer["npy"])), allow_pickle=False)


REQUESTS = [{"n": 1, "steps": 3, "seeds": 3, "class_labels": [2], "guidance_scale": 2.0},
            {"n": 2, "steps": 3, "seeds": [10, 11], "class_labels": [0, 4], "guidance_scale": [1.5, 3.0]},
            {"n": 1, "steps": 3, "seeds": 40, "class_labels": 1, "guidance_scale": 4.0},
            {"n": 2, "steps": 2, "sampler": "ddim", "seeds": 5, "class_labels": [3, 3]}]


def test_concurrent_requests_equal_direct_results():
    with serving(pipeline(), max_wait_ms=50) as (url, _):
        assert call(url, "/healthz")[:2] == (200, {"status": "ok"})
        assert call(url, "/readyz")[:2] == (200, {"ready": True})  # after the warm-up request
        answers = [None] * 8

        def ask(i):
            answers[i] = call(url, "/v1/sample", {**REQUESTS[i % 4], "output": "raw"})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        png = call(url, "/v1/sample", {"n": 2, "steps": 2})[1]
    direct = pipeline()
    for i, (status, answer, _) in enumerate(answers):
        request = REQUESTS[i % 4]
        assert status == 200, answer
        expected = direct.sample(request["n"], steps=request["steps"], sampler=request.get("sampler"),
                                 seeds=request["seeds"], class_labels=request["class_labels"],
                                 guidance_scale=request.get("guidance_scale"), output_type="raw", progress=False)
        got = torch.from_numpy(array(answer))
        assert answer["shape"] == [request["n"], 2, 8, 8] and relative(got, expected) < 1e-5, request
        assert torch.equal(got, torch.from_numpy(array(answers[i % 4][1])))  # same request, other batch-mates
        seeds = request["seeds"]
        assert answer["seeds"] == (list(range(seeds, seeds + request["n"])) if isinstance(seeds, int) else seeds)
    assert len(png["images"]) == 2 and len(png["seeds"]) == 2  # seeds drawn by the server, and returned
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(png["images"][0])))
    assert image.format == "PNG" and image.size == (8, 8)


BAD = [
    ({"n": 0}, "n", "n must be an integer in 1..4, got 0"),
    ({"n": "2"}, "n", "n must be an integer in 1..4"),
    ({"steps": 0}, "steps", "steps must be an integer >= 1, got 0"),
    ({"steps": 2, "sampler": "fast"}, "sampler", "unknown sampler 'fast'"),
    ({"n": 2, "seeds": [1]}, "seeds", "seeds must be an integer or a list of 2 integers"),
    ({"class_labels": [9]}, "class_labels", "class_labels must be an int or 1 ints in 0..4"),
    ({"guidance_scale": "x"}, "guidance_scale", "guidance_scale must be a number or a list of 1 numbers"),
    ({"guidance_scale": [1.0, 2.0]}, "guidance_scale", "guidance_scale must be a finite number or 1 of them"),
    ({"output": "jpg"}, "output", "output must be one of png, npy, raw, got 'jpg'"),
    ({"colour": 1}, "colour", "unknown field 'colour'; allowed: n, steps"),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_serves_on():
    with serving(pipeline(), warmup=False) as (url, _):
        for body, field, message in BAD:
            status, answer, _ = call(url, "/v1/sample", {"steps": 2, **body})
            assert status == 422 and answer["field"] == field and message in answer["error"], (body, answer)
        for raw in (b"{not json", b"[1, 2]"):
            status, answer, _ = call(url, "/v1/sample", raw=raw)
            assert status == 400 and "the body must be a JSON object" in answer["error"]
        status, answer, _ = call(url, "/v1/sample", {"steps": 2, "output": "npy"})
        assert status == 200 and array(answer).shape == (1, 8, 8, 2)
        metrics = call(url, "/metrics")[1]
    errors = {s.labels["kind"]: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name == "blitzdiff_errors_total"}
    assert errors == {"bad_request": len(BAD) + 2}


def test_metrics_are_prometheus_text():
    with serving(pipeline(), max_wait_ms=0) as (url, _):
        for request in REQUESTS:
            assert call(url, "/v1/sample", request)[0] == 200
        status, text, headers = call(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    images = 1 + sum(r["n"] for r in REQUESTS)  # the warm-up request, then the four
    assert samples[("blitzdiff_images_total", ())] == images
    assert samples[("blitzdiff_batch_rows_count", ())] == 1 + len(REQUESTS)
    assert samples[("blitzdiff_batch_rows_sum", ())] == images
    assert samples[("blitzdiff_request_seconds_count", ())] == len(REQUESTS)
    assert samples[("blitzdiff_queue_depth", ())] == 0
    assert 0 < samples[("blitzdiff_images_per_second", ())] <= images


def test_timeouts_and_a_full_queue_answer_without_stopping_the_server():
    with serving(pipeline(slow=0.05), max_wait_ms=0, timeout_s=0.1, warmup=False) as (url, _):
        status, answer, _ = call(url, "/v1/sample", {"steps": 10})
        assert status == 504 and "longer than 0.1 s" in answer["error"]
    with serving(pipeline(slow=0.05), max_wait_ms=0, max_queue=1, warmup=False) as (url, _):
        answers = []
        threads = [threading.Thread(target=lambda i=i: answers.append(call(url, "/v1/sample", {"steps": 4 + i})))
                   for i in range(4)]  # four keys: one runs, one waits, the rest find the queue full
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(status for status, _, _ in answers)
        assert statuses[0] == 200 and statuses[-1] == 503, statuses
        full = next(a for a in answers if a[0] == 503)
        assert full[2]["retry-after"] == "1" and "max_queue=1" in full[1]["error"]
        assert call(url, "/v1/sample", {"steps": 2})[0] == 200


def test_graceful_shutdown_finishes_accepted_requests():
    answers = []
    with serving(pipeline(slow=0.02), max_wait_ms=0, warmup=False) as (url, server):
        threads = [threading.Thread(target=lambda i=i: answers.append(call(url, "/v1/sample", {"steps": 10 + i})))
                   for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # all four accepted, most still queued or running
        server.should_exit = True
        for t in threads:
            t.join()
    assert sorted(status for status, _, _ in answers) == [200] * 4


def test_the_cli_serves_the_embedded_model_and_stops_on_sigterm():
    with socket.socket() as probe:  # a free loopback port for the child process
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, "-m", "blitzdiff", "serve", "--port", str(port), "--max-batch", "4"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "no /readyz 200 within 120 s"
            try:
                if call(url, "/readyz")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        status, answer, _ = call(url, "/v1/sample", {"n": 2, "steps": 4, "seeds": 0, "class_labels": [3, 7]})
        assert status == 200 and len(answer["images"]) == 2 and answer["seeds"] == [0, 1]
    finally:
        child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0]
    # uvicorn drains, runs the app's shutdown (the batcher drains), then re-raises SIGTERM: the conventional exit
    assert child.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
