"""How far any system could go: the network's arithmetic of a sampling run against the device's measured dense rate.

A sampling run of `steps` steps makes `pipe.evaluations(steps, sampler)` network calls, each on 2B inputs when
guided ([uncond; cond] in one call) and B otherwise; `network_flops` counts one call's FLOPs with torch's
FlopCounterMode (convolutions, matmuls, attention; element-wise ops are not counted). The dense rate is the faster
of a large GEMM and a large 3x3 convolution on this device, in the run's dtype and thread count (`dense_rate`): what
its dense-algebra libraries reach on shapes that suit them. `floor_ms = run FLOPs / dense rate` is then the time of
a run whose every counted FLOP went at that rate and everything else took no time, and `baseline ms / floor_ms`
the speed-up over that baseline such a run would have. It is a measured rate, not the hardware's peak: a kernel
faster than both would beat the floor (bench warns when a system does: the rate was then measured low), and it does
not apply to a system that does less arithmetic (Winograd or FFT convolutions, fewer network calls) or uses
another precision.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import model_class, set_backend
from .measure import synchronize

# The dense kernels timed for the device's rate: an n x n x n matmul (~90 ms on 2 CPU cores, ~1 ms on an H200) and a
# 3x3 convolution, channels-last (oneDNN on CPU, cuDNN on CUDA), [batch, channels, size, size] in and out.
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}
CONV_SHAPE = {"cpu": (8, 128, 32), "cuda": (64, 256, 64)}  # batch, channels, size
REPEATS = 7


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


def _timed_rate(run, flops: int, device: torch.device) -> dict[str, float]:
    """FLOP/s of `run` (doing `flops`): median and fastest of REPEATS synchronized calls after one warm-up."""
    times = []
    for i in range(REPEATS + 1):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return {"flops_per_s": flops / statistics.median(times), "best_flops_per_s": flops / min(times)}


@torch.no_grad()
def dense_rate(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The device's dense rate in `dtype` at torch's current thread count: a GEMM (torch.mm, n x n x n) and a 3x3
    convolution (channels-last, stride 1, same padding), each timed alone; `best_flops_per_s` is the faster kernel's
    fastest call (on the 2-core CPU target oneDNN's convolution beats MKL's GEMM: ~220 against ~190 GFLOP/s). Both
    run under torch's backend flags as the network does (on CUDA in float32: cuDNN's TF32 convolutions by default,
    so the rate, like the network's convolutions, is TF32's)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    n = GEMM_SIZE.get(device.type, GEMM_SIZE["cpu"])
    a, b = randn(n, n), randn(n, n)
    gemm = _timed_rate(lambda: torch.mm(a, b), 2 * n**3, device)
    batch, channels, size = CONV_SHAPE.get(device.type, CONV_SHAPE["cpu"])
    x = randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    w = randn(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)
    conv = _timed_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                       2 * batch * size * size * channels * channels * 9, device)
    return {"dtype": str(dtype).removeprefix("torch."), "repeats": REPEATS,
            "gemm": {"size": n, **gemm}, "conv": {"shape": [batch, channels, size, size], **conv},
            "best_flops_per_s": max(gemm["best_flops_per_s"], conv["best_flops_per_s"])}


def floor_ms(flops: int, rate: dict[str, Any]) -> float:
    """The run's FLOPs at the dense rate's fastest call, in ms (the fastest call, not the median, so that a disturbed
    repeat cannot raise the floor)."""
    return flops / rate["best_flops_per_s"] * 1e3
