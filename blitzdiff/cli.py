"""The `blitzdiff` command: `sample`, `info`, `eval`. Errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

MIN_TILE = 64  # pixels: tiny images (the embedded models are 16x16) are enlarged in the grid, nearest-neighbour


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a checkpoint folder or file, or an embedded model: "
                        "dit-digits (default), unet-digits")
    parser.add_argument("--sampler", default=None, help="a sampler name (default: the folder's scheduler)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blitzdiff", description="Fast, sync-free sampling of diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="sample a model and write a PNG grid")
    _add_model_options(sample)
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("-n", type=int, default=16, help="number of samples")
    sample.add_argument("--seed", type=int, default=0, help="sample i gets seed + i")
    sample.add_argument("--class", dest="classes", type=int, nargs="+", default=None,
                        help="class label(s) for a class-conditional model (default: 0, 1, 2, ... cycling)")
    sample.add_argument("--output", default="samples.png", help="PNG file to write (default samples.png)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="describe a checkpoint folder or file")
    info.add_argument("path", help="a checkpoint folder or file, or an embedded model name")

    evaluate = commands.add_parser("eval", help="sample quality of an embedded digits model (Frechet distance in the "
                                   "feature space of a digits classifier; class accuracy)")
    _add_model_options(evaluate)
    evaluate.add_argument("--steps", type=int, nargs="+", default=[20])
    evaluate.add_argument("-n", type=int, default=300, help="samples per evaluation")
    evaluate.add_argument("--json", help="also write the figures to this JSON file")
    return parser


def _labels(pipe, n: int, classes: Sequence[int] | None) -> list[int] | None:
    if not pipe.kind.class_conditional:
        return list(classes) if classes else None
    cycle = list(classes) if classes else list(range(pipe.num_classes))
    return [cycle[i % len(cycle)] for i in range(n)]


def grid(images: list) -> object:
    """PIL images of one size -> one PIL image, ceil(sqrt(n)) columns, tiles enlarged to at least MIN_TILE px."""
    from PIL import Image

    width, height = images[0].size
    zoom = max(1, math.ceil(MIN_TILE / max(width, height)))
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new(images[0].mode, (columns * width * zoom, rows * height * zoom))
    for i, image in enumerate(images):
        tile = image.resize((width * zoom, height * zoom), Image.NEAREST)
        sheet.paste(tile, ((i % columns) * width * zoom, (i // columns) * height * zoom))
    return sheet


def run_sample(args) -> None:
    import torch

    import blitzdiff

    pipe = blitzdiff.load(args.model, device=args.device)
    labels = _labels(pipe, args.n, args.classes)
    kwargs = dict(steps=args.steps, sampler=args.sampler, seeds=args.seed, class_labels=labels,
                  guidance_scale=args.guidance, progress=not args.no_progress)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    raw = pipe.sample(args.n, output_type="raw", **kwargs)
    if raw.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    images = blitzdiff.engine.pipeline.to_pil(pipe.decode(raw).permute(0, 2, 3, 1).cpu().numpy())
    grid(images).save(args.output)
    print(f"{pipe.name}: {args.n} samples, {args.steps} steps of {args.sampler or pipe.sampler_name} on {args.device}: "
          f"{elapsed / args.steps * 1e3:.2f} ms/step, {args.n / elapsed:.1f} images/s (first call, includes warm-up)"
          f" -> {args.output}")


def run_info(args) -> None:
    from blitzdiff.engine.pipeline import model_path
    from blitzdiff.models import describe

    print(json.dumps(describe(model_path(args.path)), indent=2, default=str))


def run_eval(args) -> None:
    import torch

    import blitzdiff
    from blitzdiff import quality

    pipe = blitzdiff.load(args.model, device=args.device)
    rows = []
    for steps in args.steps:
        labels = _labels(pipe, args.n, None)
        images = pipe.sample(args.n, steps=steps, sampler=args.sampler, seeds=0, class_labels=labels,
                             guidance_scale=args.guidance, output_type="tensor", progress=False)
        scores = quality.evaluate(images.cpu() * 2 - 1, None if labels is None else torch.tensor(labels))
        rows.append({"model": pipe.name, "sampler": args.sampler or pipe.sampler_name, "steps": steps, **scores})
        shown = ", ".join(f"{k} {scores[k]:.3f}" for k in ("fd", "accuracy") if k in scores)
        print(f"{pipe.name} {rows[-1]['sampler']} {steps} steps: {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


COMMANDS = {"sample": run_sample, "info": run_info, "eval": run_eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"blitzdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
