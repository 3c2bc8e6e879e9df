"""End-to-end sampling of an embedded model on CPU: blitzdiff's Pipeline vs diffusers' own loop, one run.

Both sides load the same checkpoint folder (blitzdiff/assets/unet-digits by default), use the same sampler and step
count, and return the final sample before decoding (blitzdiff `output_type="raw"`; diffusers: its scheduler and
model in the loop its pipelines run). Median over repeats after one warm-up run; model loading is not timed.

    python benchmarks/bench_end_to_end.py [--model unet-digits] [--samplers ddim dpmpp_2m] [--steps 20]
                                          [--batches 1 16] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _timing import median_seconds  # benchmarks/ is on sys.path when run as a script

import blitzdiff
from blitzdiff.engine.config import SAMPLERS, resolve
from blitzdiff.engine.pipeline import model_path


def diffusers_loop(folder, sampler: str, steps: int, noise: torch.Tensor, labels: torch.Tensor | None):
    """The diffusers side: its model class from the same folder, its scheduler class for `sampler`."""
    import diffusers

    pipe_config = json.loads((folder / "model_index.json").read_text())
    name = "unet" if "unet" in pipe_config else "transformer"
    model_class = getattr(diffusers, pipe_config[name][1])
    model = model_class.from_pretrained(folder / name).eval()
    fields = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    resolved = resolve(sampler, fields)
    scheduler = getattr(diffusers, resolved.class_name).from_config(dict(resolved.fields))
    channels = model.config.in_channels
    extra = {} if labels is None else {"class_labels": labels}

    @torch.inference_mode()
    def run():
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            out = model(model_in, t.expand(x.shape[0]), **extra).sample[:, :channels]
            x = scheduler.step(out, t, x).prev_sample
        return x

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-digits")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"], choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    import diffusers

    folder = model_path(args.model)
    pipe = blitzdiff.load(folder)
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}; model {args.model}, {args.steps} steps, "
          f"median of {args.repeats}, guidance off")
    print(f"{'sampler':<10} {'batch':>5} {'blitzdiff ms':>13} {'diffusers ms':>13} {'ratio':>7}")
    rows = []
    for sampler in args.samplers:
        for batch in args.batches:
            shape = pipe.latent_shape(None, None)
            noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            labels = torch.arange(batch) % pipe.num_classes if pipe.kind.class_conditional else None
            ours = median_seconds(lambda: pipe.sample(batch, steps=args.steps, sampler=sampler, noise=noise,  # noqa: B023
                                                      class_labels=labels, guidance_scale=1.0, output_type="raw",  # noqa: B023
                                                      progress=False), args.repeats)
            theirs = median_seconds(diffusers_loop(folder, sampler, args.steps, noise, labels), args.repeats)
            rows.append({"sampler": sampler, "batch": batch, "blitzdiff_ms": ours * 1e3, "diffusers_ms": theirs * 1e3,
                         "ratio": theirs / ours})
            print(f"{sampler:<10} {batch:>5} {ours * 1e3:>13.1f} {theirs * 1e3:>13.1f} {theirs / ours:>6.2f}x")
    if args.json:
        meta = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "model": args.model, "steps": args.steps, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
