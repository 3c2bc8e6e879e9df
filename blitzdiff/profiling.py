"""Profiling a sampling run: a torch.profiler trace, split per plan stage into network, solver and host time,
with the ops each stage ran (`blitzdiff profile`; `blitzdiff bench` reports the same split).

The loop's scope hook (blitzdiff.engine.sampler.Scope) wraps each part of stage k in a `record_function` range
named "blitzdiff/step k/network" (the denoiser call: network forward, preconditioning, guidance combination) or
"blitzdiff/step k/solver" (the plan's point and update combinations, their noise draws, x0 clipping /
thresholding; entered twice per stage, before and after the network). A "step" here is a plan stage: one denoiser
evaluation, so heun's N steps are 2N - 1 stages.

What the times mean (the three parts add up to the step's time):
- CPU: network_ms / solver_ms are the wall time of the ranges; step_ms runs from the step's first range to the
  next step's first range (the last step ends with its last range); host_ms = step_ms - network_ms - solver_ms is
  the loop's own Python between the ranges (stage lookup, the scope hook, the for loop). The network's and the
  solver's own Python and dispatch overhead are inside their ranges: compare a range's wall time with its ops'
  self CPU time to see them.
- CUDA: network_ms / solver_ms are the device time of the kernels (and copies) the ranges launched; step_ms runs
  on the device timeline from the step's first kernel to the next step's first kernel (the last step ends with
  its last kernel); host_ms = step_ms minus the time a kernel of the step was running: the device sat idle waiting
  for the host (launches, Python), which is what CUDA graphs remove.
Ops are attributed to a range by the profiler's parent links (`FunctionEvent.cpu_parent`: time containment on the
same thread); device kernels to the op that launched them (the profiler's correlation ids). All figures come from
one profiled run, after untimed warm-up runs (see profile_sampling); profiling adds a few microseconds
per op, so time speed with `blitzdiff bench`, not with this.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from .engine.inputs import positive_int
from .engine.sampler import Scope

PARTS = ("network", "solver")
PREFIX = "blitzdiff"
PROMPT_TOKENS = 77  # CLIP's context length: what a Stable Diffusion UNet is fed


def stage_ranges(prefix: str = PREFIX) -> Scope:
    """The loop's scope hook: scope(k, part) is a profiler range named "{prefix}/step {k}/{part}"."""

    def scope(k: int, part: str) -> record_function:
        return record_function(f"{prefix}/step {k}/{part}")

    return scope


@dataclass(frozen=True)
class OpStats:
    """One op name inside one part ("network" or "solver") of a step: how often it ran, its self CPU time
    (children excluded) and the device time of the kernels it launched itself (0 on CPU)."""

    part: str
    name: str
    calls: int
    self_cpu_ms: float
    device_ms: float


@dataclass(frozen=True)
class StepProfile:
    """One plan stage: network / solver / host milliseconds (see the module docstring), their sum step_ms, and the
    ops its ranges ran, most expensive first."""

    step: int
    network_ms: float
    solver_ms: float
    host_ms: float
    step_ms: float
    ops: tuple[OpStats, ...]


@dataclass(frozen=True)
class ProfileResult:
    """One profiled sampling run. on_device: the times are CUDA device times (else CPU wall times). total_ms: wall
    time of the whole profiled `sample` call (plan building, initial noise and the final checks included)."""

    device: str
    on_device: bool
    steps: tuple[StepProfile, ...]
    total_ms: float
    trace_path: str | None

    def ops(self, step: int | None = None) -> list[OpStats]:
        """The op table of one step, or of all steps merged (step=None), most expensive first."""
        chosen = self.steps if step is None else [s for s in self.steps if s.step == step]
        return _merge((op for s in chosen for op in s.ops), self.on_device)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "on_device": self.on_device, "total_ms": self.total_ms,
                "trace_path": self.trace_path, "summary": split_summary(self),
                "per_step": [asdict(s) for s in self.steps], "ops": [asdict(op) for op in self.ops()]}


def step_split(result: ProfileResult) -> list[dict[str, float]]:
    """Rows {"step", "network_ms", "solver_ms", "host_ms", "step_ms"}, one per plan stage."""
    return [{"step": s.step, "network_ms": s.network_ms, "solver_ms": s.solver_ms, "host_ms": s.host_ms,
             "step_ms": s.step_ms} for s in result.steps]


def split_summary(result: ProfileResult) -> dict[str, float]:
    """Medians over the steps of network_ms, solver_ms, host_ms and step_ms, plus the number of steps."""
    rows = step_split(result)
    summary = {key: statistics.median(row[key] for row in rows)
               for key in ("network_ms", "solver_ms", "host_ms", "step_ms")}
    return {"steps": len(rows), **summary}


def profile_sampling(
    pipe,
    n: int,
    *,
    steps: int,
    sampler: str | None = None,
    warmup: int = 1,
    trace_path: str | None = None,
    record_shapes: bool = False,
    **sample_kwargs: Any,
) -> ProfileResult:
    """Profile `pipe.sample(n, steps=..., sampler=..., **sample_kwargs)` (raw output, no progress bar).

    First `warmup` untimed runs without the profiler (caches, lazy initialisation; bad arguments fail here, before
    the profiler prints anything), then one run in the profiler's warm-up phase (traced and discarded: the
    profiler's own first-use costs stay out of the figures), then the recorded run. On CUDA the device is
    synchronized before each run ends. trace_path: where to write the Chrome / Perfetto trace (JSON).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    device = pipe.device
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    scope = stage_ranges()

    def run() -> None:
        pipe.sample(n, steps=steps, sampler=sampler, output_type="raw", progress=False, scope=scope,
                    **sample_kwargs)
        if on_device:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    phases = schedule(wait=0, warmup=1, active=1, repeat=1)
    with profile(activities=activities, schedule=phases, record_shapes=record_shapes) as prof:
        run()
        prof.step()
        start = time.perf_counter()
        run()
        total_ms = (time.perf_counter() - start) * 1e3
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return ProfileResult(str(device), on_device, split_steps(prof.events(), on_device, event_links(prof)), total_ms,
                         None if trace_path is None else str(trace_path))


def event_links(prof) -> Callable[[Any], int]:
    """FunctionEvent -> the correlation id of the op that launched it (0 for a frontend op). torch >= 2.12 keeps it
    on the event (linked_correlation_id); older versions only in the profiler's Kineto results, where an event is
    found by its id, device type and start (in µs from the trace's start, computed as torch computes it), a map
    built only there."""
    events = prof.events()
    if not events or hasattr(events[0], "linked_correlation_id"):
        return stored_link
    links = kineto_links(prof)
    return lambda event: links.get(event_key(event), 0)


def stored_link(event) -> int:
    """The link torch >= 2.12 stores on a FunctionEvent (see event_links)."""
    return event.linked_correlation_id


def kineto_links(prof) -> dict[tuple, int]:
    """event_key -> linked correlation id, for every event of the profiler's Kineto results."""
    kineto = prof.profiler.kineto_results
    origin = kineto.trace_start_ns()
    return {(e.correlation_id(), e.device_type(), (e.start_ns() - origin) / 1000): e.linked_correlation_id()
            for e in kineto.events()}


def event_key(event) -> tuple:
    """A FunctionEvent's (id, device type, start µs), as kineto_links keys the Kineto event it was made from."""
    return event.id, event.device_type, event.time_range.start


def split_steps(events: Sequence, on_device: bool, link: Callable[[Any], int] | None = None,
                prefix: str = PREFIX) -> tuple[StepProfile, ...]:
    """Per-step split of a profiler's FunctionEvents (`prof.events()`) whose loop ran with stage_ranges(prefix).
    link: event -> the correlation id of the op that launched it (event_links(prof); default: the event's own
    linked_correlation_id, torch >= 2.12)."""
    link = link or stored_link
    pattern = re.compile(rf"{re.escape(prefix)}/step (\d+)/({'|'.join(PARTS)})")
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    ranges = {}  # id(range event) -> (step, part)
    for event in cpu:
        match = pattern.fullmatch(event.name)
        if match:
            ranges[id(event)] = int(match[1]), match[2]
    if not ranges:
        raise ValueError(f"no '{prefix}/step k/part' ranges in the profile: the loop must run eagerly with "
                         "scope=stage_ranges() (compiled and graphed loops have no per-step ranges)")
    kernels = _kernels_by_op(events, link) if on_device else {}
    part_ms: dict[tuple[int, str], float] = defaultdict(float)
    work: dict[int, list[tuple[float, float]]] = defaultdict(list)  # step -> (start, end) µs: ranges or kernels
    ops: dict[int, list[OpStats]] = defaultdict(list)  # step -> one entry per op event
    for event in cpu:
        if id(event) in ranges:
            if not on_device:
                step, part = ranges[id(event)]
                part_ms[step, part] += event.time_range.elapsed_us() / 1e3
                work[step].append((event.time_range.start, event.time_range.end))
            continue
        owner = _owning_range(event, ranges)
        if owner is None:
            continue
        step, part = owner
        # Only frontend ops (no linked id of their own) own kernels: a runtime call's own id is a CUPTI one.
        launched = kernels.get(event.id, ()) if link(event) == 0 else ()
        device_ms = sum(k.time_range.elapsed_us() for k in launched) / 1e3
        ops[step].append(OpStats(part, event.name, 1, event.self_cpu_time_total / 1e3, device_ms))
        if on_device:
            part_ms[step, part] += device_ms
            work[step] += [(k.time_range.start, k.time_range.end) for k in launched]
    order = sorted({step for step, _ in ranges.values()})
    spans = _spans_ms(order, work)
    return tuple(StepProfile(step, part_ms[step, "network"], part_ms[step, "solver"],
                             # the clamp only matters if kernels of two steps overlapped (several streams)
                             max(spans[step] - _union_ms(work[step]), 0.0), spans[step],
                             tuple(_merge(ops[step], on_device))) for step in order)


def _owning_range(event, ranges: dict[int, tuple[int, str]]) -> tuple[int, str] | None:
    parent = event.cpu_parent
    while parent is not None and id(parent) not in ranges:
        parent = parent.cpu_parent
    return None if parent is None else ranges[id(parent)]


def _kernels_by_op(events: Sequence, link: Callable[[Any], int]) -> dict[int, list]:
    """Correlation id of a CPU op -> the device events (kernels, memcpy, memset) it launched. Device-side copies
    of record_function ranges (gpu_user_annotation) are not work and are left out."""
    launched = defaultdict(list)
    for event in events:
        if event.device_type != DeviceType.CPU and not event.is_user_annotation:
            launcher = link(event)
            if launcher > 0:
                launched[launcher].append(event)
    return launched


def _spans_ms(order: list[int], work: dict[int, list[tuple[float, float]]]) -> dict[int, float]:
    """A step's span: from its first work to the next step's first work (the gap between steps is this step's host
    overhead); the last step ends with its last work. A step without work (no kernels) spans 0."""
    starts = {step: min(start for start, _ in work[step]) for step in order if work[step]}
    spans = {}
    for i, step in enumerate(order):
        later = [starts[s] for s in order[i + 1:] if s in starts]
        if step not in starts:
            spans[step] = 0.0
        else:
            end = later[0] if later else max(end for _, end in work[step])
            spans[step] = (end - starts[step]) / 1e3
    return spans


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length in ms of the union of (start, end) intervals in µs."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def _merge(ops: Iterable[OpStats], on_device: bool) -> list[OpStats]:
    """One OpStats per (part, name), summed; most expensive first."""
    merged: dict[tuple[str, str], list[float]] = {}
    for op in ops:
        stats = merged.setdefault((op.part, op.name), [0, 0.0, 0.0])
        stats[0] += op.calls
        stats[1] += op.self_cpu_ms
        stats[2] += op.device_ms
    table = [OpStats(part, name, int(calls), cpu, dev) for (part, name), (calls, cpu, dev) in merged.items()]
    return sorted(table, key=lambda op: (op.device_ms if on_device else op.self_cpu_ms, op.calls), reverse=True)


def prompt_embeddings(pipe, n: int, guidance_scale: float | None = None, *, tokens: int = PROMPT_TOKENS,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Random stand-in prompt embeddings [n, tokens, cross_attention_dim] for a text-conditional network (plus
    negative ones when guided), drawn from a fixed seed, for speed work; {} for other networks."""
    if not pipe.kind.text_conditional:
        return {}
    generator = torch.Generator().manual_seed(seed)
    shape = (n, tokens, pipe.model.config["cross_attention_dim"])
    embeddings = {"encoder_hidden_states": torch.randn(shape, generator=generator)}
    if guidance_scale is not None and guidance_scale != 1.0:
        embeddings["negative_encoder_hidden_states"] = torch.randn(shape, generator=generator)
    return embeddings


def format_steps(result: ProfileResult) -> str:
    """The per-step table (step, network / solver / host / step ms) with a median row."""
    clock = "device time" if result.on_device else "wall time"
    rows = [[str(r["step"]), *(f"{r[key]:.3f}" for key in ("network_ms", "solver_ms", "host_ms", "step_ms"))]
            for r in step_split(result)]
    summary = split_summary(result)
    rows.append(["median", *(f"{summary[key]:.3f}" for key in ("network_ms", "solver_ms", "host_ms", "step_ms"))])
    title = f"per step ({clock}, {result.device}; whole run {result.total_ms:.2f} ms wall)"
    return title + "\n" + format_table(["step", "network ms", "solver ms", "host ms", "step ms"], rows)


def format_ops(result: ProfileResult, top: int = 20, step: int | None = None) -> str:
    """The top-`top` ops (of one step, or of all steps) by device time on CUDA, self CPU time on CPU, with their
    share of that total. On CPU the device column is left out, and a last line says how much of the ranges' wall
    time the ops' self CPU time covers (the rest is Python: module calls, the loop's own code)."""
    positive_int("top", top)
    ops = result.ops(step)
    key = "device_ms" if result.on_device else "self_cpu_ms"
    total = sum(getattr(op, key) for op in ops)
    headers = ["op", "part", "calls", "self CPU ms", *(["device ms"] if result.on_device else []), "%"]
    rows = [[op.name, op.part, str(op.calls), f"{op.self_cpu_ms:.3f}",
             *([f"{op.device_ms:.3f}"] if result.on_device else []),
             f"{100 * getattr(op, key) / total:.1f}" if total else "-"] for op in ops[:top]]
    where = "all steps" if step is None else f"step {step}"
    clock = "device" if result.on_device else "self CPU"
    lines = [f"top {min(top, len(ops))} of {len(ops)} ops, {where} (% of their {clock} time, {total:.3f} ms)",
             format_table(headers, rows)]
    if not result.on_device:
        chosen = [s for s in result.steps if step is None or s.step == step]
        ranges = sum(s.network_ms + s.solver_ms for s in chosen)
        lines.append(f"ops' self CPU time: {total:.3f} of the ranges' {ranges:.3f} ms wall; the rest: Python "
                     "(module calls, loop code), profiler overhead")
    return "\n".join(lines)


def format_report(result: ProfileResult, top: int = 20, per_step: bool = False) -> str:
    """The per-step table, then the op table of all steps, then (per_step) one op table per step."""
    parts = [format_steps(result), format_ops(result, top)]
    if per_step:
        parts += [format_ops(result, top, s.step) for s in result.steps]
    return "\n\n".join(parts)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        aligned = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(aligned)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
