"""The C++ CPU kernels (adaLN modulation, gated residual, timestep embedding; the sampling loop's solver step and
noise) at 1 and 2 threads against `ref`, as they run inside a model: each timed burst of calls follows a matmul, so
torch's OpenMP workers are awake or spinning. The loop's kernels are called as the eager loop calls them
(blitzdiff.engine.fused_step: blitzdiff._C directly, no op boundary), `ref` being their specification's torch ops.

    python benchmarks/cpu_kernel_threads.py [--rounds 30] [--json out.json]

Prints the median µs per call of each (backend, thread count), alternated round by round in one process. The
kernels split rows over torch's own OpenMP runtime (csrc/parallel.h) once a call is large enough; the embedded
models' calls are below that size and stay on one thread. The loop's kernels split from 32768 elements (solver step)
and 1024 normals (noise) per thread: the sizes here (one CIFAR image, one and eight SD latents) straddle both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _timing import device_name  # benchmarks/ is on sys.path when run as a script

from blitzdiff import _C
from blitzdiff.kernels import adaln_gated_residual, adaln_modulate, timestep_embedding
from blitzdiff.kernels.gaussian_noise import gaussian_noise_ref
from blitzdiff.kernels.solver_step import solver_step_ref

VARIANTS = [("ref", 1), ("cpu", 1), ("ref", 2), ("cpu", 2)]
CALLS = 5  # timed back to back after each matmul: one call is too short for this machine's timer and noise


def cases() -> dict[str, Callable[[str], torch.Tensor]]:
    """name -> call(backend) on fixed random inputs: a dit-digits-sized call (batch 16 with guidance) and DiT-XL/2
    sizes (256 tokens of 1152), timestep embeddings of 16 and 256 rows."""
    gen = torch.Generator().manual_seed(0)
    found = {}
    for label, (batch, tokens, dim) in {"16x64x96": (16, 64, 96), "2x256x1152": (2, 256, 1152),
                                        "8x256x1152": (8, 256, 1152)}.items():
        x, y = (torch.randn(batch, tokens, dim, generator=gen) for _ in range(2))
        shift, scale, gate = (torch.randn(batch, dim, generator=gen) for _ in range(3))
        found[f"adaln_modulate {label}"] = lambda b, x=x, s=shift, c=scale: adaln_modulate(x, s, c, 1e-6, backend=b)
        found[f"adaln_gated_residual {label}"] = lambda b, x=x, y=y, g=gate: adaln_gated_residual(x, y, g, backend=b)
    for rows, dim in ((16, 256), (256, 320)):
        t = torch.linspace(0, 999, rows)
        found[f"timestep_embedding {rows}x{dim}"] = lambda b, t=t, d=dim: timestep_embedding(t, d, backend=b)
    for n in (3072, 16384, 131072):  # 1x3x32x32, 1x4x64x64, 8x4x64x64
        found[f"solver_step (Euler) {n}"] = loop_step(n, gen)
        found[f"gaussian_noise {n}"] = loop_noise(n)
    return found


def loop_step(n: int, gen: torch.Generator) -> Callable[[str], torch.Tensor]:
    """An Euler stage's update, x_next = a x + b (c_skip x + c_out out), over n elements (the loop stores no
    estimate), as run_fused calls the kernel; `ref` the specification."""
    out, x = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    x_next = torch.empty(n)

    def call(backend: str) -> torch.Tensor:
        if backend == "ref":
            return solver_step_ref(out, x, None, [], [], None, 1.1, -0.5, 1.0, 0.9, [0.1], [], 0.0)[1]
        _C.solver_step_cpu(0, x_next.data_ptr(), out.data_ptr(), x.data_ptr(), n, False, "float32", 1.1, -0.5, 1.0,
                           [x.data_ptr(), 0], [0.9, 0.1], torch.get_num_threads(), 0, 0)
        return x_next

    return call


def loop_noise(n: int) -> Callable[[str], torch.Tensor]:
    """One sample's noise of n normals, as draw_noise calls the kernel; `ref` the specification."""
    seeds, out = torch.tensor([3]), torch.empty(n)

    def call(backend: str) -> torch.Tensor:
        if backend == "ref":
            return gaussian_noise_ref(seeds, 5, (n,), torch.float32)
        _C.gaussian_noise_cpu(out.data_ptr(), seeds.data_ptr(), 1, n, 5, "float32", torch.get_num_threads())
        return out

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="also write the medians here")
    args = parser.parse_args()
    saved = torch.get_num_threads()
    a = torch.randn(256, 1152)
    w = torch.randn(1152, 1152)
    rows = {}
    print(f"{'case':36} " + " ".join(f"{b}@{n:<9}" for b, n in VARIANTS) + "  (µs per call, median)")
    try:
        for name, call in cases().items():
            times: dict[str, list[float]] = {f"{b}@{n}": [] for b, n in VARIANTS}
            for _ in range(args.rounds):
                for backend, threads in VARIANTS:
                    torch.set_num_threads(threads)
                    call(backend)  # warm
                    a @ w  # an OpenMP region just before the calls, as in a model
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        call(backend)
                    times[f"{backend}@{threads}"].append((time.perf_counter() - start) * 1e6 / CALLS)
            rows[name] = {key: statistics.median(values) for key, values in times.items()}
            print(f"{name:36} " + " ".join(f"{rows[name][key]:<11.1f}" for key in times))
    finally:
        torch.set_num_threads(saved)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(torch.device("cpu")).split(",")[0], "torch": torch.__version__,
                       "rounds": args.rounds, "us_per_call": rows}, f, indent=1)


if __name__ == "__main__":
    main()
