"""The embedded models' eager sampling with the network's kernels on `ref` and on `auto`, alternated in one process
(separate runs on this project's shared CPU drift more than the difference being measured).

    python benchmarks/kernels_auto_vs_ref.py [--models dit-digits unet-digits] [--batches 1 8] [--rounds 3]
                                             [--threads 2] [--json out.json]

Prints, per model and batch, the median ms per 10-step DPM-Solver++(2M) run of each round, `ref` then `auto`.
"""

import argparse
import json

import torch
from _timing import median_seconds  # benchmarks/ is on sys.path when run as a script

import blitzdiff
from blitzdiff.bench import sample_inputs


def medians(model: str, batch: int, rounds: int, repeats: int) -> dict[str, list[float]]:
    pipe = blitzdiff.load(model)
    inputs = sample_inputs(pipe, batch, pipe.default_guidance_scale)

    def run() -> None:
        pipe.sample(batch, steps=10, sampler="dpmpp_2m", output_type="raw", progress=False, **inputs)

    found: dict[str, list[float]] = {"ref": [], "auto": []}
    for backend in ("ref", "auto") * rounds:
        pipe.compile(mode="eager", kernels=backend)
        run()  # a warm-up beside median_seconds' own
        found[backend].append(round(median_seconds(run, repeats) * 1e3, 1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dit-digits", "unet-digits"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for model in args.models:
        for batch in args.batches:
            results[f"{model} b{batch}"] = found = medians(model, batch, args.rounds, 30 if batch == 1 else 12)
            print(f"{model} batch {batch}: ref {found['ref']} ms, auto {found['auto']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "interleaved_ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
