"""`blitzdiff serve`: a Pipeline's batcher behind an ASGI app (Starlette, served by uvicorn; the `serve` extra).

    POST /v1/sample  JSON {n, steps, sampler, seeds, class_labels, guidance_scale, output: png | npy | raw}
                     -> {"seeds": [...], "images": [base64 PNG, ...]} or {"seeds": [...], "npy": base64 .npy}
    GET  /healthz    200 while the process serves
    GET  /readyz     200 once the warm-up request has run (compile / graph capture done), else 503
    GET  /metrics    Prometheus text: request latency and batch-size histograms, queue depth, images, images/s,
                     errors by kind

Bad requests get a 4xx JSON {"error": what was wrong and what is allowed, "field": the field or null}; a full queue
503 with Retry-After; a request over its timeout 504. Shutdown (SIGINT / SIGTERM, uvicorn's) stops accepting,
finishes the requests in flight, then drains the batcher.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from ..engine.inputs import MAX_SEED
from ..engine.network import NonFiniteOutput
from .batcher import Batcher, BatchStats, QueueFull

FIELDS = ("n", "steps", "sampler", "seeds", "class_labels", "guidance_scale", "output")
OUTPUTS = {"png": "numpy", "npy": "numpy", "raw": "raw"}  # the response format -> the batcher's output_type
DEFAULT_STEPS = 20
RATE_WINDOW_S = 60.0  # images/s is measured over the last minute of batches


class BadRequest(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Metrics:
    """The app's Prometheus registry (its own, so that several apps in one process do not collide)."""

    def __init__(self, batcher_depth: Any, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram("blitzdiff_request_seconds", "POST /v1/sample latency, answered requests (200)",
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        rows = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_rows = Histogram("blitzdiff_batch_rows", "rows per bucket run", registry=self.registry,
                                    buckets=[b for b in rows if b <= max_batch])
        self.images = Counter("blitzdiff_images", "images sampled", registry=self.registry)
        self.errors = Counter("blitzdiff_errors", "failed requests by kind", ["kind"], registry=self.registry)
        Gauge("blitzdiff_queue_depth", "requests waiting in the batcher", registry=self.registry).set_function(
            batcher_depth)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        Gauge("blitzdiff_images_per_second", f"images/s over the last {RATE_WINDOW_S:g} s",
              registry=self.registry).set_function(self.rate)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_rows.observe(stats.rows)
        self.images.inc(stats.rows)
        with self._lock:
            self._recent.append((time.monotonic(), stats.rows))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(rows for _, rows in self._recent) / RATE_WINDOW_S

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(pipe: Any, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
               timeout_s: float = 60.0, warmup: bool = True):
    """The Starlette app serving `pipe` (compiled or not: see Pipeline.batcher). The batcher starts with the app's
    lifespan and is drained when it ends; warmup runs one default request before /readyz turns 200."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    state: dict[str, Any] = {"ready": False, "batcher": None}
    metrics = Metrics(lambda: 0 if state["batcher"] is None else state["batcher"].queue_depth, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = pipe.batcher(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                        on_batch=metrics.on_batch)
        if warmup:
            kwargs = request_arguments(pipe, {}, max_batch)
            kwargs.pop("format")
            await state["batcher"].submit_async(kwargs.pop("n"), **kwargs)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await asyncio.to_thread(state["batcher"].close, True)

    async def sample(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            body = None
        status, payload, kind = await answer(pipe, state["batcher"], body, max_batch=max_batch, timeout_s=timeout_s)
        if kind is not None:
            metrics.errors.labels(kind).inc()
        else:
            metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(payload, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v1/sample", sample, methods=["POST"]), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metrics", prometheus)]
    return Starlette(routes=routes, lifespan=lifespan)


async def answer(pipe: Any, batcher: Batcher, body: Any, *, max_batch: int,
                 timeout_s: float) -> tuple[int, dict[str, Any], str | None]:
    """One POST /v1/sample: (HTTP status, JSON payload, error kind or None). The server's route and the Ray Serve
    deployment (blitzdiff.serving.ray_serve) both answer with it."""

    def error(status: int, kind: str, message: str, field: str | None = None) -> tuple[int, dict[str, Any], str]:
        return status, {"error": message, "field": field}, kind

    if not isinstance(body, dict):
        return error(400, "bad_request", "the body must be a JSON object")
    try:
        kwargs = request_arguments(pipe, body, max_batch)
        output = kwargs.pop("format")
        future = batcher.submit(kwargs.pop("n"), **kwargs)
    except BadRequest as bad:
        return error(422, "bad_request", str(bad), bad.field)
    except QueueFull as full:
        return error(503, "queue_full", str(full))
    except ValueError as bad:  # the pipeline's own checks (sampler, steps, labels, ...), naming the field
        return error(422, "bad_request", str(bad), field_named(str(bad)))
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        future.cancel()
        return error(504, "timeout", f"the request took longer than {timeout_s:g} s")
    except NonFiniteOutput as bad:
        return error(500, "non_finite", str(bad))
    except Exception as failed:  # noqa: BLE001 - one request's failure is its own 500, never the server's
        return error(500, "internal", f"{type(failed).__name__}: {failed}")
    return 200, {"seeds": kwargs["seeds"], **encode(result, output)}, None


def request_arguments(pipe: Any, body: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """The JSON body as Batcher.submit arguments (plus "n" and "format"): JSON types checked per field, seeds drawn
    when absent (and returned, so a result can be reproduced), class labels cycling 0, 1, ... when absent."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}", unknown[0])
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= max_batch:
        raise BadRequest(f"n must be an integer in 1..{max_batch}, got {n!r}", "n")
    steps = body.get("steps", DEFAULT_STEPS)
    if not _is_int(steps) or steps < 1:
        raise BadRequest(f"steps must be an integer >= 1, got {steps!r}", "steps")
    sampler = body.get("sampler")
    if sampler is not None and not isinstance(sampler, str):
        raise BadRequest(f"sampler must be a string (a name from blitzdiff.SAMPLERS) or null, got {sampler!r}",
                         "sampler")
    output = body.get("output", "png")
    if output not in OUTPUTS:
        raise BadRequest(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}", "output")
    seeds = body.get("seeds")
    if seeds is None:
        start = secrets.randbelow(MAX_SEED - n)
        seeds = list(range(start, start + n))
    elif _is_int(seeds):
        seeds = list(range(seeds, seeds + n))
    if not isinstance(seeds, list) or len(seeds) != n or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
        raise BadRequest(f"seeds must be an integer or a list of {n} integers in 0..2**63-1", "seeds")
    labels = body.get("class_labels")
    if labels is None and pipe.kind.class_conditional:
        labels = [i % pipe.num_classes for i in range(n)]
    if labels is not None and not (_is_int(labels) or isinstance(labels, list) and all(map(_is_int, labels))):
        raise BadRequest(f"class_labels must be an integer or a list of {n} integers", "class_labels")
    scale = body.get("guidance_scale")
    if scale is not None and not (_is_number(scale) or isinstance(scale, list) and all(map(_is_number, scale))):
        raise BadRequest(f"guidance_scale must be a number or a list of {n} numbers", "guidance_scale")
    return {"n": n, "steps": steps, "sampler": sampler, "seeds": seeds, "class_labels": labels,
            "guidance_scale": scale, "output_type": OUTPUTS[output], "format": output}


def encode(result: Any, output: str) -> dict[str, Any]:
    """png: {"images": base64 PNGs} from float [n, H, W, C] in [0, 1]; npy / raw: {"npy": base64 of np.save of
    the float32 array (images [n, H, W, C] in [0, 1], or the raw loop output [n, C, h, w])}."""
    if output == "png":
        from PIL import Image

        pixels = (result * 255).round().astype(np.uint8)
        images = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
            images.append(base64.b64encode(buffer.getvalue()).decode())
        return {"images": images}
    array = result if isinstance(result, np.ndarray) else result.cpu().numpy()
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    return {"npy": base64.b64encode(buffer.getvalue()).decode(), "shape": list(array.shape)}


def field_named(message: str) -> str | None:
    """The request field a pipeline error message is about (its messages start with or name the field)."""
    names = {"steps": "steps", "sampler": "sampler", "seeds": "seeds", "class_labels": "class_labels",
             "guidance_scale": "guidance_scale", "output_type": "output"}
    for word, field in names.items():
        if word in message:
            return field
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compile_for_serving(pipe: Any, mode: str | None, max_batch: int) -> None:
    """Compile `pipe` in `mode` (None: "graph" on CUDA, else "eager") with the one bucket max_batch, as the batcher
    needs: the server's and each Ray Serve replica's pipeline."""
    pipe.compile(mode or ("graph" if pipe.device.type == "cuda" else "eager"), buckets=(max_batch,))


def serve(pipe: Any, *, host: str = "127.0.0.1", port: int = 8000, mode: str | None = None, max_batch: int = 16,
          max_wait_ms: float = 5.0, max_queue: int = 256, timeout_s: float = 60.0, log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT / SIGTERM. mode: the pipeline's runtime (compiled with the one bucket
    max_batch; None: "graph" on CUDA, else "eager")."""
    import uvicorn

    compile_for_serving(pipe, mode, max_batch)
    app = create_app(pipe, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=timeout_s)
