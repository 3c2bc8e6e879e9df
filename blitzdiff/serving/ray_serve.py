"""Scale-out on Ray Serve (the `ray` extra): replicas of the same batcher, placed and autoscaled by Ray.

Each replica loads the model, compiles it with the one bucket max_batch and answers exactly as `blitzdiff serve`
(blitzdiff.serving.server.answer: same JSON, same 4xx / 503 / 504): over HTTP through Ray Serve's proxy
(POST {route_prefix}) or through a deployment handle (`handle.sample.remote(body)`). Ray spreads requests over the
replicas; each replica batches what it receives, with rows bitwise independent of their batch-mates.

    from ray import serve
    from blitzdiff.serving.ray_serve import app
    serve.run(app("dit-digits", num_replicas=2), route_prefix="/v1/sample")
"""

from __future__ import annotations

from typing import Any

from .server import answer, compile_for_serving


class Replica:
    """One Ray Serve replica: a pipeline, its batcher, and answer() for HTTP requests and handle calls."""

    def __init__(self, model: str, device: str | None, mode: str | None, max_batch: int, max_wait_ms: float,
                 max_queue: int, timeout_s: float):
        import blitzdiff

        pipe = blitzdiff.load(model, device=device)
        compile_for_serving(pipe, mode, max_batch)
        self.pipe, self.max_batch, self.timeout_s = pipe, max_batch, timeout_s
        self.batcher = pipe.batcher(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)

    async def sample(self, body: Any) -> dict[str, Any]:
        """A handle call: the JSON payload with its HTTP "status" and the answering replica's id."""
        from ray import serve

        status, payload, _ = await answer(self.pipe, self.batcher, body, max_batch=self.max_batch,
                                          timeout_s=self.timeout_s)
        return {"status": status, "replica": serve.get_replica_context().replica_id.unique_id, **payload}

    async def __call__(self, request: Any) -> Any:
        """An HTTP request through Ray Serve's proxy (a Starlette Request)."""
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
        except ValueError:
            body = None
        status, payload, _ = await answer(self.pipe, self.batcher, body, max_batch=self.max_batch,
                                          timeout_s=self.timeout_s)
        return JSONResponse(payload, status_code=status)

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close(drain=False)


def app(model: str = "dit-digits", *, device: str | None = None, mode: str | None = None, max_batch: int = 16,
        max_wait_ms: float = 5.0, max_queue: int = 256, timeout_s: float = 60.0, num_replicas: int | str = 1,
        autoscaling_config: dict[str, Any] | None = None, ray_actor_options: dict[str, Any] | None = None) -> Any:
    """A Ray Serve application of `model` (a name or a folder every node can read): pass it to serve.run.
    num_replicas: a fixed count; autoscaling_config instead lets Ray's autoscaler choose it (e.g. {"min_replicas":
    1, "max_replicas": 8, "target_ongoing_requests": 2 * max_batch}); ray_actor_options: per replica, e.g.
    {"num_gpus": 1}."""
    from ray import serve

    options: dict[str, Any] = {"ray_actor_options": ray_actor_options or {},
                               "max_ongoing_requests": max_queue + max_batch}
    if autoscaling_config is not None:  # Ray's autoscaler picks the count
        options |= {"autoscaling_config": autoscaling_config, "num_replicas": "auto"}
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(Replica, name="blitzdiff").options(**options)
    return deployment.bind(model, device, mode, max_batch, max_wait_ms, max_queue, timeout_s)


def build(args: dict[str, str]) -> Any:
    """The application builder of Ray Serve's CLI: `serve run blitzdiff.serving.ray_serve:build model=dit-digits
    num_replicas=2 max_batch=16` (every app() keyword as key=value; numbers converted)."""
    numbers = {"max_batch": int, "max_queue": int, "num_replicas": int, "max_wait_ms": float, "timeout_s": float}
    unknown = sorted(set(args) - {"model", "device", "mode", *numbers})
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; allowed: model, device, mode, "
                         f"{', '.join(numbers)}")
    kwargs = {k: numbers[k](v) if k in numbers else v for k, v in args.items()}
    return app(**kwargs)
