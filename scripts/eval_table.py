"""The README's quality table of the embedded models: sampler x steps, Frechet distance and class accuracy.

    python scripts/eval_table.py [--samplers ddim dpmpp_2m unipc euler_ancestral] [--steps 1 2 4 10 20 50]
                                 [-n 500] [--json benchmarks/results/eval_default_models.json]

Each cell samples n images (seeds 0..n-1; classes cycling 0..9 for the DiT, guidance at its recommended scale unless
--guidance is given) and scores them with blitzdiff.quality against the held-out digits. Prints a Markdown table per
model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import blitzdiff
from blitzdiff import quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet-digits", "dit-digits"])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "unipc", "euler_ancestral"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10, 20, 50])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale of class-conditional models "
                        "(default: the model's recommended one, Pipeline.default_guidance_scale)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        pipe = blitzdiff.load(name)
        labels = torch.arange(args.n) % pipe.num_classes if pipe.kind.class_conditional else None
        guidance = pipe.default_guidance_scale if labels is None or args.guidance is None else args.guidance
        print(f"\n{name} (n={args.n}, guidance {guidance:g}; FD / accuracy)\n")
        print("| sampler | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
        print("|---|" + "---|" * len(args.steps))
        for sampler in args.samplers:
            cells = []
            for steps in args.steps:
                start = time.perf_counter()
                images = pipe.sample(args.n, steps=steps, sampler=sampler, seeds=0, class_labels=labels,
                                     guidance_scale=guidance, output_type="tensor", progress=False)
                scores = quality.evaluate(images * 2 - 1, labels)
                rows.append({"model": name, "sampler": sampler, "steps": steps, "n": args.n, "guidance": guidance,
                             "seconds": time.perf_counter() - start, **scores})
                cell = f"{scores['fd']:.1f}"
                if "accuracy" in scores:
                    cell += f" / {scores['accuracy']:.2f}"
                cells.append(cell)
            print(f"| `{sampler}` | " + " | ".join(cells) + " |", flush=True)
        real = quality.load_digits("train")[0]
        subset = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))[: args.n]
        reference = quality.evaluate(real[subset])  # the same n: FD estimates are biased upwards at small n
        print(f"\n{args.n} random real training digits vs held-out: FD {reference['fd']:.1f}")
    if args.json:
        meta = {"device": f"cpu ({platform.machine()})", "threads": torch.get_num_threads(), "torch": torch.__version__,
                "n": args.n, "guidance": args.guidance, "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
