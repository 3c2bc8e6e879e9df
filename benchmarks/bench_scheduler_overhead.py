"""Per-step overhead of the scheduler core vs diffusers' `scheduler.step()`, on CPU, same tensors, one run.

"Overhead" is everything in a sampling step except the network: the network is replaced by a function that
returns a precomputed tensor, so both loops do identical network work (none) and the time left is the scheduler's:
model-input scaling, prediction-type conversion and the solver update (and, for diffusers, its Python bookkeeping).

    python benchmarks/bench_scheduler_overhead.py [--steps 50] [--repeats 15] [--threads N] [--json out.json] [--quick]

Per sampler and shape, after one warm-up call of each, `repeats` rounds time one run of each loop, the order
swapped every round (a drift of the machine moves both sides of a round alike). Reports each loop's median
microseconds per step over the rounds and the speed-up diffusers / blitzdiff as the median of the per-round ratios,
with their quartiles. The process's malloc is tuned first, as a blitzdiff Pipeline's first CPU run tunes it
(blitzdiff.malloc; both loops share it; BLITZDIFF_MALLOC=system leaves glibc's defaults), and the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
from _timing import QUICK_HELP, cpu_threads  # benchmarks/ is on sys.path when run as a script

import blitzdiff
from blitzdiff.bench.interleave import interleave
from blitzdiff.engine.config import resolve
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.functional import parameterization, postprocessing
from blitzdiff.engine.noise import NOISE_BACKENDS, resolve_noise_backend, seed_tensor
from blitzdiff.engine.sampler import run_plan
from blitzdiff.engine.solvers import build_plan
from blitzdiff.malloc import malloc_record, tune_malloc_once

CASES = {  # name -> (blitzdiff sampler, diffusers class)
    "ddim": ("ddim", "DDIMScheduler"),
    "euler": ("euler", "EulerDiscreteScheduler"),
    "euler_ancestral": ("euler_ancestral", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", "DPMSolverMultistepScheduler"),
    "unipc": ("unipc", "UniPCMultistepScheduler"),
}
SHAPES = {"pixel 1x3x32x32": (1, 3, 32, 32), "latent 1x4x64x64": (1, 4, 64, 64), "latent 8x4x64x64": (8, 4, 64, 64)}
QUICK_SHAPES = {"pixel 1x3x8x8": (1, 3, 8, 8)}



def blitzdiff_loop(sampler: str, shape, steps: int, noise_backend: str):
    noise = torch.randn(shape)
    output = torch.randn(shape)
    config = resolve(sampler, {"clip_sample": False})
    backend = resolve_noise_backend(noise_backend, noise.device, noise.dtype)
    kind, constants = parameterization(config)

    def run():
        # The plan is built inside the timed region: host math is part of the cost we claim.
        plan = build_plan(config, steps)
        denoiser = Denoiser(lambda x, t: output, plan, kind, batch=shape[0], device=noise.device, **constants)
        return run_plan(plan, denoiser, noise * plan.init_scale, seed_tensor(0, shape[0], noise.device),
                        postprocessing(config), backend, step_backend="auto")

    return run


def diffusers_loop(sampler: str, class_name: str, shape, steps: int):
    import diffusers

    noise = torch.randn(shape)
    output = torch.randn(shape)
    fields = dict(resolve(sampler, {"clip_sample": False}).fields)
    scheduler = getattr(diffusers, class_name).from_config(fields)

    def run():
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(output, t, x).prev_sample
        return x

    return run


def interleaved_us(ours, theirs, steps: int, rounds: int) -> tuple[list[float], list[float], dict]:
    """(our µs per step per round, theirs, the per-round ratio's median and quartiles): one warm-up run of each,
    then bench's interleaving (blitzdiff.bench.interleave: one timed run of each loop per round, order rotated)."""
    ours(), theirs()
    result = interleave({"blitzdiff-loop": lambda batch, steps: ours(), "diffusers": lambda batch, steps: theirs()},
                        [(1, steps)], lambda batch: {}, rounds, torch.device("cpu"), log=lambda line: None)
    if result["errors"]:
        raise RuntimeError(f"a loop failed: {result['errors']}")
    (configuration,) = result["configurations"]
    per_step = {name: [ms * 1e3 / steps for ms in times] for name, times in configuration["times_ms"].items()}
    (ratio,) = configuration["ratios"]
    return per_step["blitzdiff-loop"], per_step["diffusers"], ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15, help="rounds (one run of each loop per round)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--samplers", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--noise-backend", default="auto", choices=NOISE_BACKENDS,
                        help="how stochastic samplers draw noise (auto: the compiled C++ kernel where built)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP + "; 4 steps, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 4, 3
    import diffusers
    tune_malloc_once()  # as a Pipeline's first CPU run: freed state tensors stay with the process
    with cpu_threads(args.threads) as threads:
        print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              f"torch {torch.__version__}, diffusers {diffusers.__version__}, blitzdiff {blitzdiff.__version__}; "
              f"{args.steps} steps, {args.repeats} interleaved rounds, noise backend {args.noise_backend}")
        print(f"{'sampler':<16} {'shape':<18} {'blitzdiff us/step':>18} {'diffusers us/step':>18} "
              f"{'ratio [rounds quartiles]':>26}")
        rows = []
        for name in args.samplers:
            sampler, class_name = CASES[name]
            for shape_name, shape in (QUICK_SHAPES if args.quick else SHAPES).items():
                ours, theirs, ratio = interleaved_us(
                    blitzdiff_loop(sampler, shape, args.steps, args.noise_backend),
                    diffusers_loop(sampler, class_name, shape, args.steps), args.steps, args.repeats)
                row = {"sampler": name, "shape": list(shape), "blitzdiff_us_per_step": statistics.median(ours),
                       "diffusers_us_per_step": statistics.median(theirs), "ratio": ratio["median"],
                       "ratio_q25": ratio["q25"], "ratio_q75": ratio["q75"], "blitzdiff_us_rounds": ours,
                       "diffusers_us_rounds": theirs}
                rows.append(row)
                print(f"{name:<16} {shape_name:<18} {row['blitzdiff_us_per_step']:>18.1f} "
                      f"{row['diffusers_us_per_step']:>18.1f} {row['ratio']:>10.1f}x "
                      f"[{row['ratio_q25']:.1f}-{row['ratio_q75']:.1f}]")
    if args.json:
        meta = {"device": "cpu", "threads": threads.record(), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "steps": args.steps, "repeats": args.repeats,
                "noise_backend": args.noise_backend, "malloc": malloc_record(),
                "method": "rounds: one timed run of each loop per round, order rotated; ratio = median of the "
                          "per-round ratios (ratio_q25 / ratio_q75 their quartiles)"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "warnings": threads.warnings()}, f, indent=2)


if __name__ == "__main__":
    main()
