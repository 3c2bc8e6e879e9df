"""`blitzdiff eval` across models and step counts: sample quality (blitzdiff.quality) against the network evaluations
a run costs, as a table, a plot of FD against NFE and a sheet of samples, one row per (model, steps).

NFE counts what the hardware does: the plan's network evaluations per run (Heun's 2 * steps - 1), doubled when
classifier-free guidance runs the unconditional rows too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import quality

SHEET_COLUMNS = 10  # samples shown per row of the sheet: one per digit class for the class-conditional models


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` of `blitzdiff eval`: a model with its own sampler and step counts (None: the command's)."""

    model: str | None
    sampler: str | None = None
    steps: tuple[int, ...] | None = None


def model_spec(text: str | None, is_model: Callable[[str], bool]) -> ModelSpec:
    """MODEL[:SAMPLER][@STEPS[,STEPS...]], e.g. "dit-digits:ddim@4,50", into a ModelSpec; `text` is taken whole when
    is_model(text) (an existing path or an embedded name), so paths holding ':' or '@' still work."""
    if text is None or is_model(text):
        return ModelSpec(text)
    model, at, steps_text = text.partition("@")
    model, colon, sampler = model.partition(":")
    steps = None
    if at:
        try:
            steps = tuple(int(part) for part in steps_text.split(","))
        except ValueError:
            steps = ()
        if not steps or min(steps) < 1:
            raise ValueError(f"--model {text}: the steps after '@' must be integers >= 1 separated by commas (e.g. "
                             f"{model}@4,50), got {steps_text!r}")
    if colon and not sampler:
        raise ValueError(f"--model {text}: name a sampler after ':' (e.g. {model}:ddim) or leave out the ':'")
    return ModelSpec(model, sampler or None, steps)


def network_evaluations(pipe: Any, steps: int, sampler: str | None, guidance: float) -> int:
    """NFE of one sampling run: the plan's stages, x2 when guided (the batch is doubled, [uncond; cond])."""
    return pipe.evaluations(steps, sampler) * (2 if guidance != 1.0 else 1)


def evaluate(pipe: Any, steps: int, n: int, sampler: str | None, guidance: float, labels: list[int] | None,
             on_evaluation: Callable[[], None]) -> tuple[dict[str, Any], torch.Tensor]:
    """One row of the table (model, sampler, steps, nfe, guidance, fd[, accuracy]) and the images [n, C, H, W] in
    [0, 1]; the seeds (0 .. n-1) and labels are the same for every model and step count."""
    images = pipe.sample(n, steps=steps, sampler=sampler, seeds=0, class_labels=labels, guidance_scale=guidance,
                         output_type="tensor", progress=False, callback=lambda i, t, x: on_evaluation())
    scores = quality.evaluate(images.cpu() * 2 - 1, None if labels is None else torch.tensor(labels))
    row = {"model": pipe.name, "sampler": sampler or pipe.sampler_name, "steps": steps,
           "nfe": network_evaluations(pipe, steps, sampler, guidance), "guidance": guidance, **scores}
    return row, images.cpu()


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width table: model, sampler, steps, NFE, guidance, FD, class accuracy."""
    header = f"{'model':<16} {'sampler':<14} {'steps':>5} {'NFE':>5} {'guidance':>8} {'FD':>8} {'accuracy':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        accuracy = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        lines.append(f"{r['model']:<16} {r['sampler']:<14} {r['steps']:>5} {r['nfe']:>5} {r['guidance']:>8g} "
                     f"{r['fd']:>8.2f} {accuracy:>8}")
    return "\n".join(lines)


def plot_fd_against_nfe(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """A PNG: FD (lower is better) against NFE on a log axis, one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the user has
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["nfe"])
        label = f"{model} ({mine[0]['sampler']})"
        axes.plot([r["nfe"] for r in mine], [r["fd"] for r in mine], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("network evaluations per sample (NFE)")
    axes.set_ylabel("Frechet distance (digits judge), lower is better")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def sample_sheet(rows: Sequence[dict[str, Any]], images: Sequence[torch.Tensor], path: str | Path,
                 tile: int = 48, gap: int = 2) -> None:
    """A PNG with one row per table row: its label ("model, steps, NFE") and its first SHEET_COLUMNS samples."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_width = 12 + math.ceil(max(measure.textlength(_label(r)) for r in rows))  # PIL's default font
    width = label_width + SHEET_COLUMNS * (tile + gap)
    sheet = Image.new("L", (width, len(rows) * (tile + gap) + gap), 255)
    draw = ImageDraw.Draw(sheet)
    for row_index, (row, batch) in enumerate(zip(rows, images, strict=True)):
        top = gap + row_index * (tile + gap)
        draw.text((4, top + tile // 2 - 6), _label(row), fill=0)
        for column, image in enumerate(batch[:SHEET_COLUMNS]):
            pixels = (image.mean(0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # [H, W], channels averaged
            tile_image = Image.fromarray(pixels, mode="L").resize((tile, tile), Image.NEAREST)
            sheet.paste(tile_image, (label_width + column * (tile + gap), top))
    sheet.save(path)


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']}, {row['steps']} steps, NFE {row['nfe']}"
