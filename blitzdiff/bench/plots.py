"""`blitzdiff bench --plots DIR`: latency vs steps and throughput vs batch, one line per system through the medians,
error bars from the fastest to the slowest repeat, as PNG files.

matplotlib is imported here, inside the function, and drawn through its Agg canvas directly: no pyplot, no global
backend switch, nothing happens at import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .measure import device_label
from .report import value_range


def plot_paths(results: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """{"latency", "throughput"} -> the PNG paths, named after the model, sampler and device type."""
    meta = results["meta"]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{meta['model']}-{meta['sampler']}-{meta['device']['type']}")
    return {kind: Path(folder) / f"{stem}-{name}.png"
            for kind, name in (("latency", "latency-vs-steps"), ("throughput", "throughput-vs-batch"))}


def write_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the two plots into `folder` (created if needed); returns their paths."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter, NullLocator
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or blitzdiff[bench])") from None

    meta = results["meta"]
    paths = plot_paths(results, folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    title = f"{meta['model']} · {meta['sampler']} · {meta['dtype']} · {device_label(meta['device'])}"
    charts = (("latency", "steps", "median_ms", f"ms per run (batch {meta['latency_batch']})", "sampling steps"),
              ("throughput", "batch", "images_per_s", f"images/s ({meta['throughput_steps']} steps)", "batch size"))
    note = f"median of {meta['repeats']}; bars: min-max of the repeats"
    for kind, x_key, y_key, y_label, x_label in charts:
        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        rows = [r for r in results["rows"] if r["kind"] == kind]
        for system in dict.fromkeys(r["system"] for r in rows):
            points = sorted((r[x_key], *value_range(r, y_key)) for r in rows if r["system"] == system)
            bars = [[y - low for _, y, low, _ in points], [high - y for _, y, _, high in points]]
            axes.errorbar([x for x, *_ in points], [y for _, y, *_ in points], yerr=bars, marker="o", capsize=3,
                          label=system)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        # plain numbers: the measured x values as ticks, y labelled on a log scale without exponents
        xs = sorted({r[x_key] for r in rows})
        axes.set_xticks(xs, labels=[f"{x:g}" for x in xs])
        axes.xaxis.set_minor_locator(NullLocator())
        axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        axes.set_xlabel(x_label)
        axes.set_ylabel(f"{y_label}\n{note}")
        axes.set_title(title, fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.savefig(paths[kind], dpi=120)
    return list(paths.values())
