"""`blitzdiff bench` results as text tables (throughput, latency, speed-ups, build time, peak memory, per-step split)
and as a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..profiling import format_table  # columns: first left-aligned, the others right-aligned
from .measure import device_label
from .suite import BASELINES


def systems_measured(results: dict[str, Any]) -> list[str]:
    """System names in the order they were measured (first row of each)."""
    return list(dict.fromkeys(row["system"] for row in results["rows"]))


def _ratio_columns(systems: list[str]) -> list[tuple[str, str]]:
    """(baseline, blitzdiff system) pairs that have speed-ups: baseline's time / blitzdiff's time."""
    return [(b, s) for s in systems if s.startswith("blitzdiff-") for b in BASELINES if b in systems]


def _sweep_table(results: dict[str, Any], kind: str, varied: str, value: str) -> str:
    rows = [r for r in results["rows"] if r["kind"] == kind]
    systems = systems_measured(results)
    cells = {(r["system"], r[varied]): r for r in rows}
    ratios = _ratio_columns(systems)
    headers = [varied, *systems, *(f"{b} / {s.removeprefix('blitzdiff-')}" for b, s in ratios)]
    table = []
    for point in dict.fromkeys(r[varied] for r in rows):
        line = [str(point)]
        line += [f"{cells[s, point][value]:.2f}" if (s, point) in cells else "-" for s in systems]
        line += [f"{cells[s, point]['speedup'][b]:.2f}x" if b in cells.get((s, point), {}).get("speedup", {})
                 else "-" for b, s in ratios]
        table.append(line)
    return format_table(headers, table)


def format_results(results: dict[str, Any]) -> str:
    """The whole report: header, throughput and latency tables with speed-ups, build times, peak memory, the
    per-step split and the systems that were skipped or failed."""
    meta = results["meta"]
    parts = [f"{meta['model']}, sampler {meta['sampler']}, {meta['dtype']}, guidance {meta['guidance_scale']:g}; "
             f"{meta['device']['type']} ({device_label(meta['device'])}); median of {meta['repeats']} after a "
             f"warm-up call; torch {meta['versions']['torch']}, diffusers {meta['versions']['diffusers']}"]
    if results["rows"]:
        parts.append(f"throughput, images/s at {meta['throughput_steps']} steps (speed-up: baseline time / blitzdiff "
                     "time)\n" + _sweep_table(results, "throughput", "batch", "images_per_s"))
        parts.append(f"latency, ms per run at batch {meta['latency_batch']}\n"
                     + _sweep_table(results, "latency", "steps", "median_ms"))
        parts.append(f"peak memory, MiB: the peak (its rise above the memory in use before the run), throughput "
                     f"runs; {meta['memory']['method']}\n" + _memory_table(results))
    parts.append("build, s (first call minus steady state, summed over configurations; the runtime's own build_s "
                 "in brackets): " + ", ".join(_build(s) for s in results["systems"] if s["status"] == "ok"))
    parts.append(_split_line(results["step_split"]))
    notes = [f"{s['name']}: {s['status']} ({s.get('reason') or s.get('error')})" for s in results["systems"]
             if s["status"] != "ok"]
    return "\n\n".join(part for part in [*parts, "\n".join(notes)] if part)


def _build(system: dict[str, Any]) -> str:
    entries = system.get("runtime_stats", {}).get("entries", [])
    runtime = f" [{sum(e['build_s'] for e in entries):.2f} over {len(entries)} entries]" if entries else ""
    return f"{system['name']} {system['build_s']:.2f}{runtime}"


def _memory_table(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if r["kind"] == "throughput"]
    systems = systems_measured(results)
    cells = {(r["system"], r["batch"]): f"{r['peak_total_bytes'] / 2**20:.1f} (+{r['peak_memory_bytes'] / 2**20:.1f})"
             for r in rows}
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    return format_table(["batch", *systems], [[str(b), *(cells.get((s, b), "-") for s in systems)] for b in batches])


def _split_line(split: dict[str, Any] | None) -> str:
    if split is None:
        return ""
    where = f"per-step split ({split['system']}, batch {split['batch']}, {split['steps']} steps"
    if "error" in split:
        return f"{where}): not measured ({split['error']})"
    median = split["median"]
    return (f"{where}, {split['clock']}, median over steps): network {median['network_ms']:.3f} ms, solver "
            f"{median['solver_ms']:.3f} ms, host {median['host_ms']:.3f} ms, step {median['step_ms']:.3f} ms")


def write_json(results: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
