"""The Ray Serve deployment (blitzdiff.serving.ray_serve) on a local Ray instance: two replicas, requests spread over
both, every answer equal to the pipeline's own result (bitwise to the same request through a batcher alone)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import ray
import torch
from ray import serve

from blitzdiff import load
from blitzdiff.serving.ray_serve import app

BUCKET = 4
BODIES = [{"n": 1 + i % 2, "steps": 3, "seeds": 10 * i, "class_labels": [i % 10, (i + 5) % 10][:1 + i % 2],
           "guidance_scale": 1.0 + 0.5 * (i % 3), "output": "raw"} for i in range(12)]


@pytest.fixture(scope="module")
def handle():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP port opened by the test
        yield serve.run(app("dit-digits", num_replicas=2, max_batch=BUCKET, max_wait_ms=20,
                            ray_actor_options={"num_cpus": 0.5}), name="blitzdiff-test", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def raw(answer: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(base64.b64decode(answer["npy"])), allow_pickle=False))


def test_two_replicas_answer_like_the_pipeline(handle):
    answers = [r.result(timeout_s=300) for r in [handle.sample.remote(body) for body in BODIES]]
    assert all(a["status"] == 200 for a in answers), answers
    assert len({a["replica"] for a in answers}) == 2  # Ray spread the requests over both replicas
    pipe = load("dit-digits")
    # Ray starts these replicas with OMP_NUM_THREADS=1 (num_cpus 0.5). Bitwise equality needs the same thread count
    # here: GEMMs split over 2 threads rounded differently on an AVX-512 Xeon (not on an AMD EPYC).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with load("dit-digits").batcher(max_batch=BUCKET, max_wait_ms=0) as alone:
            for body, answer in zip(BODIES, answers, strict=True):
                kwargs = {"steps": body["steps"], "seeds": body["seeds"], "class_labels": body["class_labels"],
                          "guidance_scale": body["guidance_scale"], "output_type": "raw"}
                assert torch.equal(raw(answer), alone.submit(body["n"], **kwargs).result(timeout=60)), body
                direct = pipe.sample(body["n"], **kwargs, progress=False)
                assert (raw(answer) - direct).abs().max() <= 1e-5 * direct.abs().max(), body
    finally:
        torch.set_num_threads(threads)


def test_bad_requests_are_answered_by_the_replica(handle):
    answer = handle.sample.remote({"n": 99, "steps": 2}).result(timeout_s=120)
    assert answer["status"] == 422 and answer["field"] == "n" and "n must be an integer in 1..4" in answer["error"]
