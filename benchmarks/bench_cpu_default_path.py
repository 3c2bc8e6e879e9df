"""The default CPU path (`pipe.sample`, eager) against the settings it departs from, each in a fresh process as a
user runs it, and optionally ONNX Runtime behind the same loop.

    python benchmarks/bench_cpu_default_path.py [--models unet-digits dit-digits unet32] [--batches 1 8]
        [--rounds 3] [--runs 10] [--threads 2] [--onnxruntime] [--json out.json] [--quick]

Per model and batch, each round starts one process per variant (the order rotated round by round): "default"
(blitzdiff.load's channels-last weights on the CPU, blitzdiff.malloc's settings, forwards replayed from CPU graphs:
blitzdiff.engine.cpu_graph), "eager forwards" (`pipe.cpu_graphs = None`), "contiguous weights"
(blitzdiff.load(channels_last=False)), "glibc malloc" (BLITZDIFF_MALLOC=system) and with --onnxruntime
"onnxruntime" (`pipe.compile("onnxruntime")`, defaults otherwise). A process loads the model, samples 3 warm-up
runs, then times `runs` runs of DPM-Solver++(2M) 10 steps and counts its minor page faults. Reports per variant the
median over rounds of the processes' medians (and their range), faults per run, and each variant's time over the
default one's (median of the per-round ratios). unet32 is cpu_best.py's 6.5 M-parameter 32x32 UNet2D with random
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _timing import QUICK_HELP, cpu_threads, device_name  # benchmarks/ is on sys.path when run as a script
from cpu_best import write_unet32

from blitzdiff.bench.interleave import rotated

# variant -> (environment, child mode)
VARIANTS = {"default": ({}, "default"), "eager forwards": ({}, "eager"), "contiguous weights": ({}, "contiguous"),
            "glibc malloc": ({"BLITZDIFF_MALLOC": "system"}, "default"), "onnxruntime": ({}, "onnxruntime")}
# One process: the default path's steady state. argv: model, batch, steps, runs, threads, mode.
CHILD = """
import json, resource, statistics, sys, time, torch, blitzdiff
from blitzdiff.malloc import malloc_record
model, batch, steps, runs, threads, mode = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
torch.set_num_threads(threads)
pipe = blitzdiff.load(model, channels_last=False if mode == "contiguous" else None)
if mode == "onnxruntime":
    pipe.compile("onnxruntime")
if mode == "eager":
    pipe.cpu_graphs = None
inputs = {"class_labels": [i % 10 for i in range(batch)]} if pipe.kind.class_conditional else {}
def run():
    pipe.sample(batch, steps=steps, sampler="dpmpp_2m", seeds=0, output_type="raw", progress=False, **inputs)
for _ in range(3):
    run()
faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
for _ in range(runs):
    start = time.perf_counter()
    run()
    times.append((time.perf_counter() - start) * 1e3)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / runs
graphs = None if pipe.cpu_graphs is None or pipe.runtime is not None else pipe.cpu_graphs.stats()
print(json.dumps({"median_ms": statistics.median(times), "faults_per_run": faults, "malloc": malloc_record(),
                  "cpu_graphs": graphs}))
"""


def run_process(model: str, batch: int, steps: int, runs: int, threads: int, variant: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "BLITZDIFF_MALLOC"))}
    variables, mode = VARIANTS[variant]
    env.update(variables)
    result = subprocess.run([sys.executable, "-c", CHILD, model, str(batch), str(steps), str(runs), str(threads),
                             mode], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} on {model} batch {batch} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet-digits", "dit-digits", "unet32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each process (default: blitzdiff bench's rule, decided once here)")
    parser.add_argument("--onnxruntime", action="store_true", help="also ONNX Runtime behind the same loop")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP + "; unet-digits batch 1, 2 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.rounds, args.runs, args.steps = ["unet-digits"], [1], 1, 2, 2
    variants = [v for v in VARIANTS if v != "onnxruntime" or args.onnxruntime]
    rows = []
    with cpu_threads(args.threads) as threads, tempfile.TemporaryDirectory() as tmp:
        count = threads.count
        print(f"{args.steps} steps DPM-Solver++(2M), {args.runs} runs per process, {args.rounds} rounds, "
              f"{count} torch threads per process")
        print(f"{'variant':<18} {'model':<12} {'batch':>5} {'ms per run':>10} {'range':>17} {'faults/run':>10} "
              f"{'x default':>9}")
        for name in args.models:
            model = str(write_unet32(Path(tmp) / name)) if name == "unet32" else name
            for batch in args.batches:
                results: dict[str, list[dict]] = {v: [] for v in variants}
                for r in range(args.rounds):
                    for variant in rotated(variants, r):
                        results[variant].append(run_process(model, batch, args.steps, args.runs, count, variant))
                for variant in variants:
                    times = [p["median_ms"] for p in results[variant]]
                    ratio = statistics.median(p["median_ms"] / t["median_ms"]
                                              for p, t in zip(results[variant], results["default"], strict=True))
                    faults = statistics.median(p["faults_per_run"] for p in results[variant])
                    rows.append({"variant": variant, "model": name, "batch": batch, "median_ms": statistics.median(
                        times), "process_medians_ms": times, "faults_per_run": faults, "over_default": ratio,
                        "malloc": results[variant][0]["malloc"], "cpu_graphs": results[variant][0]["cpu_graphs"]})
                    print(f"{variant:<18} {name:<12} {batch:>5} {statistics.median(times):>10.2f} "
                          f"{f'[{min(times):.2f}-{max(times):.2f}]':>17} {faults:>10.0f} {ratio:>8.2f}x")
    if args.json:
        meta = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
                "threads": threads.record(), "steps": args.steps, "runs": args.runs, "rounds": args.rounds,
                "command": sys.argv}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "warnings": threads.warnings()},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
