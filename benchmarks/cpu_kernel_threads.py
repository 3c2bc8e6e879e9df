"""The C++ CPU kernels (adaLN modulation, gated residual, timestep embedding) at 1 and 2 threads against `ref`, as
they run inside a model: each timed burst of calls follows a matmul, so torch's OpenMP workers are awake or
spinning.

    python benchmarks/cpu_kernel_threads.py [--rounds 30] [--json out.json]

Prints the median µs per call of each (backend, thread count), alternated round by round in one process. The
kernels split rows over torch's own OpenMP runtime (csrc/parallel.h) once a call is large enough; the embedded
models' calls are below that size and stay on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from blitzdiff.kernels import adaln_gated_residual, adaln_modulate, timestep_embedding

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
    return found


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
            json.dump({"torch": torch.__version__, "rounds": args.rounds, "us_per_call": rows}, f, indent=1)


if __name__ == "__main__":
    main()
