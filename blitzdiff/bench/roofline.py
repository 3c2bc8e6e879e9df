"""How far any system could go: the network's arithmetic of a sampling run against the device's measured GEMM rate.

A sampling run of `steps` steps makes `pipe.evaluations(steps, sampler)` network calls, each on 2B inputs when
guided ([uncond; cond] in one call) and B otherwise; `network_flops` counts one call's FLOPs with torch's
FlopCounterMode (convolutions, matmuls, attention; element-wise ops are not counted). The GEMM rate is what this
device does on one large square matmul in the run's dtype and thread count (`gemm_rate`), the best rate its
dense-algebra libraries reach. So `floor_ms = run FLOPs / GEMM rate` is a lower bound on a run's time for any system
that does the network's arithmetic in that dtype with the usual algorithms, and `baseline ms / floor_ms` an upper
bound on the speed-up over that baseline. It is not a bound for a system that does less arithmetic (Winograd or FFT
convolutions, sparsity, fewer network calls) or uses another precision.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import model_class, set_backend
from .measure import synchronize

GEMM_SIZE = {"cpu": 2048, "cuda": 8192}  # n of the n x n x n matmul: ~90 ms on 2 CPU cores, ~1 ms on an H200
GEMM_REPEATS = 7


def network_flops(pipe, batch: int) -> int:
    """FLOPs of one network call on `batch` inputs: FlopCounterMode over a meta-device twin (no memory, no compute)
    running the reference kernels (a fused custom op is invisible to the counter)."""
    with torch.device("meta"):
        twin = model_class(pipe.model.diffusers_class).from_config(pipe.model.config)
    set_backend(twin, "ref")
    x = torch.zeros((batch, *pipe.latent_shape(None, None)), device="meta")
    cond = {}
    if pipe.kind.class_conditional:
        cond["class_labels"] = torch.zeros(batch, dtype=torch.int64, device="meta")
    if pipe.kind.text_conditional:
        cond["encoder_hidden_states"] = torch.zeros((batch, 77, pipe.model.config["cross_attention_dim"]),
                                                    device="meta")
    with FlopCounterMode(display=False) as counter:
        twin(x, torch.zeros(batch, device="meta"), **cond)
    return counter.get_total_flops()


def run_flops(pipe, sampler: str, batch: int, steps: int, guidance: float) -> int:
    """The network FLOPs of one sampling run: evaluations x one call's FLOPs at the network batch."""
    network_batch = batch * (2 if guidance != 1.0 else 1)
    return pipe.evaluations(steps, sampler) * network_flops(pipe, network_batch)


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int | None = None) -> dict[str, Any]:
    """FLOP/s of an n x n by n x n matmul (torch.mm) on `device` in `dtype` at torch's current thread count: the
    median of GEMM_REPEATS synchronized calls after one warm-up, with the fastest call's rate beside it."""
    n = size or GEMM_SIZE.get(device.type, GEMM_SIZE["cpu"])
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn((n, n), generator=generator).to(device, dtype) for _ in range(2))
    times = []
    for i in range(GEMM_REPEATS + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"size": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": flops / statistics.median(times),
            "best_flops_per_s": flops / min(times), "repeats": GEMM_REPEATS}


def floor_ms(flops: int, gemm: dict[str, Any]) -> float:
    """The run's FLOPs at the fastest GEMM call's rate, in ms: the bound (the fastest call, not the median, so that
    a disturbed repeat cannot raise it)."""
    return flops / gemm["best_flops_per_s"] * 1e3
