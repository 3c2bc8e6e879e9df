"""`blitzdiff bench` results as text tables (throughput, latency, speed-ups, build time, peak memory, per-step split)
with the spread of the repeats and the run's warnings, and as a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..profiling import format_table  # columns: first left-aligned, the others right-aligned
from .interleave import fastest_pair
from .measure import UNSTABLE_MAX_OVER_MIN, UNSTABLE_REL_IQR, device_label
from .suite import BASELINES


def systems_measured(results: dict[str, Any]) -> list[str]:
    """System names in the order they were measured (first row of each)."""
    return list(dict.fromkeys(row["system"] for row in results["rows"]))


def value_range(row: dict[str, Any], value: str) -> tuple[float, float, float]:
    """(median, low, high) of a row's repeats in the unit of `value`: "median_ms" (ms per run) or "images_per_s"
    (the slowest repeat gives the lowest throughput)."""
    if value == "median_ms":
        return row["median_ms"], row["min_ms"], row["max_ms"]
    assert value == "images_per_s", value
    images_ms = row["batch"] * 1e3
    return images_ms / row["median_ms"], images_ms / row["max_ms"], images_ms / row["min_ms"]


def _number(x: float) -> str:
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def _cell(row: dict[str, Any], value: str) -> str:
    """"median [min-max] ±IQR%", "!" appended when the row is unstable."""
    median, low, high = value_range(row, value)
    return (f"{_number(median)} [{_number(low)}-{_number(high)}] ±{row['rel_iqr']:.0%}"
            + ("!" if row["unstable"] else ""))


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
        line += [_cell(cells[s, point], value) if (s, point) in cells else "-" for s in systems]
        line += [f"{cells[s, point]['speedup'][b]:.2f}x" if b in cells.get((s, point), {}).get("speedup", {})
                 else "-" for b, s in ratios]
        table.append(line)
    return format_table(headers, table)


def _best_table(results: dict[str, Any], kind: str, varied: str) -> str:
    """Per point of the sweep: the fastest blitzdiff system against the fastest baseline (both by median), the
    speed-up (the baseline's time / blitzdiff's), whether it is further from 1 than the control moved (suite.Job.
    control; "-" without one) and, when the roofline was measured, the run's floor and the largest speed-up over
    that baseline it allows (bench.roofline); "" when either side has no row."""
    rows = [r for r in results["rows"] if r["kind"] == kind]
    floors = {(r["batch"], r["steps"]): r["floor_ms"] for r in results.get("roofline", {}).get("runs", [])}
    control = results.get("control") or {}
    drift = control.get("max_deviation")  # None: no control measured (or it failed)
    table = []
    for point in dict.fromkeys(r[varied] for r in rows):
        here = [r for r in rows if r[varied] == point]
        ours = [r for r in here if r["system"].startswith("blitzdiff-")]
        theirs = [r for r in here if r["system"] in BASELINES]
        if not ours or not theirs:
            continue
        best, peer = (min(side, key=lambda r: r["median_ms"]) for side in (ours, theirs))
        floor = floors.get((best["batch"], best["steps"]))
        speedup = peer["median_ms"] / best["median_ms"]
        table.append([str(point), f"{best['system']} {best['median_ms']:.2f} ms",
                      f"{peer['system']} {peer['median_ms']:.2f} ms", f"{speedup:.2f}x",
                      "-" if drift is None else "yes" if abs(speedup - 1) > drift else "no",
                      "-" if floor is None else f"{floor:.2f} ms", "-" if floor is None
                      else f"{peer['median_ms'] / floor:.2f}x"])
    headers = [varied, "fastest blitzdiff", "fastest baseline", "speed-up", "beyond drift", "floor", "speed-up bound"]
    return format_table(headers, table) if table else ""


def _interleaved_table(interleaved: dict[str, Any]) -> str:
    """Per interleaved configuration: its fastest blitzdiff system against its fastest baseline (medians over the
    rounds) and the median and quartiles of their per-round speed-ups (bench.interleave)."""
    table = []
    for configuration in interleaved["configurations"]:
        best = fastest_pair(configuration)
        if best is None:
            continue
        medians = configuration["median_ms"]
        table.append([str(configuration["batch"]), str(configuration["steps"]),
                      f"{best['system']} {medians[best['system']]:.2f} ms",
                      f"{best['baseline']} {medians[best['baseline']]:.2f} ms",
                      f"{best['median']:.2f}x", f"{best['q25']:.2f}-{best['q75']:.2f}x"])
    headers = ["batch", "steps", "fastest blitzdiff", "fastest baseline", "speed-up", "rounds' quartiles"]
    lines = [format_table(headers, table)] if table else []
    lines += [f"{name}: failed while interleaved ({error})" for name, error in interleaved["errors"].items()]
    return (f"interleaved: every system timed again, one call each per round, {interleaved['rounds']} rounds, the "
            "order rotated; speed-up = the median over the rounds of the baseline's time / blitzdiff's in the same "
            "round (ms: medians over the rounds; all pairs in the JSON)\n" + "\n".join(lines)) if lines else ""


def format_results(results: dict[str, Any]) -> str:
    """The whole report: header (device, threads, load), throughput and latency tables (median, range, IQR) with
    speed-ups, build times, peak memory, the per-step split, the systems that were skipped or failed, and last the
    run's warnings."""
    meta, threads = results["meta"], results["meta"]["threads"]
    loads = "/".join("-" if load is None else f"{load:.2f}" for load in (threads["load_before"], threads["load_after"]))
    parts = [f"{meta['model']}, sampler {meta['sampler']}, {meta['dtype']}, guidance {meta['guidance_scale']:g}; "
             f"{meta['device']['type']} ({device_label(meta['device'])}); torch {meta['versions']['torch']}, "
             f"diffusers {meta['versions']['diffusers']}\n"
             f"{threads['count']} torch thread{'s' if threads['count'] != 1 else ''} "
             f"({'as requested' if threads['requested'] else 'by the load rule'}) "
             f"on {threads['usable_cores']} usable cores, load average {loads} before/after; {_malloc(meta)}\n"
             f"cells: median [min-max] ±IQR/median of {meta['repeats']} timed runs after a warm-up call; ! unstable "
             f"(IQR > {UNSTABLE_REL_IQR:.0%} of the median or slowest / fastest > {UNSTABLE_MAX_OVER_MIN:g})"]
    if results["rows"]:
        parts.append(f"throughput, images/s at {meta['throughput_steps']} steps (speed-up: baseline time / blitzdiff "
                     "time)\n" + _sweep_table(results, "throughput", "batch", "images_per_s"))
        parts.append(f"latency, ms per run at batch {meta['latency_batch']}\n"
                     + _sweep_table(results, "latency", "steps", "median_ms"))
        best = [(title, _best_table(results, kind, varied)) for title, kind, varied in (
            (f"throughput at {meta['throughput_steps']} steps", "throughput", "batch"),
            (f"latency at batch {meta['latency_batch']}", "latency", "steps"))]
        parts += [f"fastest against fastest, {title} (ms per run)\n{table}" for title, table in best if table]
        if results.get("interleaved"):
            parts.append(_interleaved_table(results["interleaved"]))
        parts.append(f"peak memory, MiB: the peak (its rise above the memory in use before the run), throughput "
                     f"runs; {meta['memory']['method']}\n" + _memory_table(results))
    parts.append("build, s (first call minus steady state, summed over configurations; the runtime's own build_s "
                 "in brackets): " + ", ".join(_build(s) for s in results["systems"] if s["status"] == "ok"))
    parts.append(_control_line(results.get("control")))
    parts.append(_split_line(results["step_split"]))
    parts.append(_roofline_line(results.get("roofline")))
    notes = [f"{s['name']}: {s['status']} ({s.get('reason') or s.get('error')})" for s in results["systems"]
             if s["status"] != "ok"]
    return "\n\n".join(part for part in [*parts, "\n".join(notes), format_warnings(results["warnings"])] if part)


def _malloc(meta: dict[str, Any]) -> str:
    record = meta.get("malloc")  # absent from results written before blitzdiff.malloc
    if record is None:
        return "malloc not recorded"
    if record["tuned"]:
        return (f"malloc tuned (mmap threshold {record['mmap_threshold'] // 2**20} MiB, trim threshold "
                f"{record['trim_threshold'] // 2**20} MiB)")
    return f"malloc as the system set it ({record['reason']})"


def format_warnings(warnings: list[str]) -> str:
    """A banner listing `warnings` (bench's, or the load warnings of `blitzdiff profile`), or "" when none."""
    if not warnings:
        return ""
    banner = "!" * 80
    return "\n".join([banner, f"WARNING: these figures may be wrong ({len(warnings)} problem"
                       f"{'s' if len(warnings) != 1 else ''}):", *(f"  - {w}" for w in warnings), banner])


def _build(system: dict[str, Any]) -> str:
    stats = system.get("runtime_stats", {})
    entries = stats.get("entries", [])
    runtime = f" [{sum(e['build_s'] for e in entries):.2f} over {len(entries)} entries]" if entries else ""
    network = stats.get("network")  # an external runtime: exported and loaded by compile(), before the first call
    loaded = f" + {network['load_s']:.2f} export and load" if network else ""
    return f"{system['name']} {system['build_s']:.2f}{runtime}{loaded}"


def _memory_table(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if r["kind"] == "throughput"]
    systems = systems_measured(results)
    cells = {(r["system"], r["batch"]): f"{r['peak_total_bytes'] / 2**20:.1f} (+{r['peak_memory_bytes'] / 2**20:.1f})"
             for r in rows}
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    return format_table(["batch", *systems], [[str(b), *(cells.get((s, b), "-") for s in systems)] for b in batches])


def _control_line(control: dict[str, Any] | None) -> str:
    if control is None:
        return ""
    if "error" in control:
        return f"control: {control['system']} not measured again ({control['error']})"
    ratios = [r["ratio"] for r in control["rows"]]
    return (f"control: {control['system']} measured again after every other system took {min(ratios):.2f}-"
            f"{max(ratios):.2f}x its first medians: speed-ups within {control['max_deviation']:.0%} of 1 are within "
            "this run's drift")


def _split_line(split: dict[str, Any] | None) -> str:
    if split is None:
        return ""
    where = f"per-step split ({split['system']}, batch {split['batch']}, {split['steps']} steps"
    if "error" in split:
        return f"{where}): not measured ({split['error']})"
    median = split["median"]
    return (f"{where}, {split['clock']}, median over steps): network {median['network_ms']:.3f} ms, solver "
            f"{median['solver_ms']:.3f} ms, host {median['host_ms']:.3f} ms, step {median['step_ms']:.3f} ms")


def _roofline_line(roofline: dict[str, Any] | None) -> str:
    if roofline is None:
        return ""
    if "error" in roofline:
        return f"roofline: not measured ({roofline['error']})"
    rates = "; ".join(_rate(when, rate) for when, rate in zip(("before", "after"), roofline["rates"], strict=True))
    return (f"roofline: dense rate {roofline['best_flops_per_s'] / 1e9:.1f} GFLOP/s, the fastest call of a GEMM and a "
            f"3x3 convolution measured before and after the systems ({rates}); floor = the run's network FLOPs at "
            "that rate; speed-up bound = the fastest baseline's time / floor (see bench.roofline for what they bound)")


def _rate(when: str, rate: dict[str, Any]) -> str:
    if "error" in rate:
        return f"{when}: {rate['error']}"
    gemm, conv = rate["gemm"], rate["conv"]
    return (f"{when}: {gemm['size']}^3 GEMM {gemm['best_flops_per_s'] / 1e9:.1f}, conv "
            f"{'x'.join(map(str, conv['shape']))} {conv['best_flops_per_s'] / 1e9:.1f}")


def write_json(results: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
