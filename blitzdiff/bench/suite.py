"""`blitzdiff bench`: blitzdiff's runtime modes and the diffusers baseline on one checkpoint, sampler and dtype.

For each system (a blitzdiff runtime mode, `Pipeline.compile(mode=...)`, or a diffusers baseline) it measures
throughput (images/s) over batch sizes at a fixed step count and latency (ms per run and per step) over step counts
at one batch size, each configuration by `measure.measure` (build call, untimed warm-up with the memory probe,
median and spread of the timed repeats); for blitzdiff eager also the per-step network / solver / host split from
blitzdiff.profiling. Every system gets the same initial noise and conditioning (bench.workload). A failing
non-eager system (a compile error, say) is recorded with its error and the run goes on. The run uses the torch
thread count of bench.threads (one that leaves the cores other work occupies) and ends with its warnings: unstable
configurations, an oversubscribed CPU, too few repeats to judge, a latency that fell as the steps grew, a control
(blitzdiff eager measured again after every other system, Job.control) that moved beyond 10%. Last it
sets each configuration's network FLOPs against the device's dense rate, measured before and after the systems
(bench.roofline): the run's floor, and a warning when a system beat it. With `interleave`, every system stays
alive after its sweep and all of them are then timed again call by call, in rotating order (Job.interleaved): the
speed-ups of that phase compare calls made seconds apart, not sweeps made minutes apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import pairwise
from typing import Any

import torch

from ..engine.config import resolve
from ..engine.loading import load
from ..models import check_backend, default_channels_last
from ..profiling import profile_sampling, split_summary
from ..profiling import step_split as per_step_rows
from .baseline import DiffusersSampler
from .interleave import interleave
from .measure import (
    UNSTABLE_MAX_OVER_MIN,
    UNSTABLE_REL_IQR,
    Measurement,
    error_line,
    measure,
    run_record,
)
from .roofline import dense_rate, floor_ms, run_flops
from .threads import CpuThreads
from .workload import sample_inputs

# Pipeline.compile modes, measured in this order (eager first); "compile-loop" is mode "compile" with
# compile_loop=True (the whole loop compiled with the network inlined: compile time grows with the step count);
# "onnxruntime" / "tensorrt" run the exported network (their build call includes the export).
MODES = ("eager", "compile", "compile-loop", "step", "graph", "onnxruntime", "tensorrt")
CUDA_ONLY_MODES = ("step", "graph", "tensorrt")  # CUDA graphs, TensorRT engines
# diffusers' loop around its own network: eager, torch.compile'd, and each with channels-last weights (not a default
# of its pipelines, but what a user tuning diffusers on CPU would try: it moves convolutions to oneDNN there).
BASELINES = ("diffusers", "diffusers-compile", "diffusers-channels-last", "diffusers-compile-channels-last")
DTYPES = ("float32", "float16", "bfloat16")
# What an option left unset means; --quick is a CI-sized smoke run. Default modes that need CUDA are skipped, with
# a note, on other devices (naming one explicitly there is an error).
DEFAULTS = {"modes": ("eager", "compile", "graph"), "batches": (1, 4, 16), "steps": (1, 2, 4, 8, 20, 50),
            "throughput_steps": 20, "latency_batch": 1, "repeats": 5, "baseline": BASELINES[:2]}
QUICK = {"modes": ("eager", "graph"), "batches": (1, 2), "steps": (1, 2), "throughput_steps": 2, "latency_batch": 1,
         "repeats": 3, "baseline": ("diffusers",)}

Sample = Callable[..., torch.Tensor]  # sample(n, *, steps, **sample_inputs(...)) -> the final sample


@dataclass(frozen=True)
class BenchConfig:
    """What one `blitzdiff bench` run measures (the fields are the command's options). modes / baseline None: the
    defaults (DEFAULTS, or QUICK); threads None: bench.threads.THREAD_RULE."""

    model: str | None = None
    sampler: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    modes: tuple[str, ...] | None = None
    batches: tuple[int, ...] = DEFAULTS["batches"]
    steps: tuple[int, ...] = DEFAULTS["steps"]
    throughput_steps: int = DEFAULTS["throughput_steps"]
    latency_batch: int = DEFAULTS["latency_batch"]
    guidance: float | None = None
    repeats: int = DEFAULTS["repeats"]
    baseline: tuple[str, ...] | None = None
    threads: int | None = None
    quick: bool = False
    channels_last: bool | None = None  # blitzdiff modes only: blitzdiff.load(channels_last=...); None: the device's
    kernels: str | None = None  # blitzdiff modes only: Pipeline.compile(kernels=...); None keeps the model's (ref)
    control: bool = True  # measure blitzdiff-eager again after every other system (Job.control)
    interleave: bool = False  # then time every system again, alternated call by call (Job.interleaved)


def bench_config(*, quick: bool = False, **options: Any) -> BenchConfig:
    """A BenchConfig from command-line options (BenchConfig's field names, as `blitzdiff bench`'s flags); None means
    the default (QUICK's when quick). Modes and baseline stay None when not given: planned_systems resolves them (a
    default CUDA-only mode is skipped, not refused)."""
    unknown = sorted(set(options) - {f.name for f in fields(BenchConfig)})
    if unknown:
        allowed = ", ".join(f.name for f in fields(BenchConfig) if f.name != "quick")
        raise ValueError(f"unknown bench option(s) {unknown}; allowed: {allowed}")
    defaults = QUICK if quick else DEFAULTS
    values = {name: value for name, value in defaults.items() if name not in ("modes", "baseline")}
    values.update({name: tuple(dict.fromkeys(value)) if isinstance(value, list | tuple) else value  # deduplicated
                   for name, value in options.items() if value is not None})
    return BenchConfig(quick=quick, **values)


def _check_counts(name: str, values: tuple[int, ...]) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be ints >= 1, got {list(values)}")


def planned_systems(config: BenchConfig, device: torch.device) -> tuple[list[str], list[str], list[dict]]:
    """(blitzdiff modes to run, baselines to run, skipped systems with the reason). ValueError on a bad config."""
    for name, values in (("batch sizes", config.batches), ("step counts", config.steps)):
        _check_counts(name, values)
    for name in ("throughput_steps", "latency_batch", "repeats"):
        _check_counts(name.replace("_", " "), (getattr(config, name),))
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; allowed: {', '.join(DTYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    given = config.modes is not None
    modes = config.modes if given else (QUICK if config.quick else DEFAULTS)["modes"]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; allowed: {', '.join(MODES)}")
    skipped = []
    if device.type != "cuda":
        cuda_only = [m for m in modes if m in CUDA_ONLY_MODES]
        if cuda_only and given:
            raise ValueError(f"mode(s) {', '.join(cuda_only)} need --device cuda (CUDA graphs, TensorRT); on "
                             f"{device.type} use eager, compile, compile-loop or onnxruntime")
        skipped = [{"name": f"blitzdiff-{m}", "status": "skipped", "reason": f"needs CUDA; the device is {device.type}"}
                   for m in cuda_only]
    baselines = config.baseline if config.baseline is not None else (QUICK if config.quick else DEFAULTS)["baseline"]
    if baselines == ("none",):
        baselines = ()
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baseline(s) {bad}; allowed: {', '.join(BASELINES)}, or none alone")
    run_modes = [m for m in MODES if m in modes and not (device.type != "cuda" and m in CUDA_ONLY_MODES)]
    return run_modes, [b for b in BASELINES if b in baselines], skipped


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every system of `config`; returns the results (see README, "Benchmarks": JSON fields). `log` gets
    the progress: the thread count, then one line per configuration as it is measured."""
    device = torch.device(config.device)
    modes, baselines, systems = planned_systems(config, device)
    with CpuThreads(config.threads) as threads:
        log(threads.describe())
        for skipped in systems:
            log(f"{skipped['name']}: skipped ({skipped['reason']})")
        pipe = load(config.model, device=device, dtype=config.dtype, channels_last=config.channels_last)
        sampler = config.sampler or pipe.sampler_name
        if sampler is None:
            raise ValueError(f"{pipe.name}'s scheduler class has no blitzdiff sampler: pass --sampler")
        guidance = pipe.default_guidance_scale if config.guidance is None else config.guidance
        check_job(pipe, sampler, guidance)
        if config.kernels is not None:  # refused now, not after the step split
            check_backend(pipe.model, config.kernels)
        configurations = Job.configurations(config)
        control = config.control and "eager" in modes and len(modes) + len(baselines) > 1
        job = Job(pipe, sampler, guidance, config, log,
                  total=(len(modes) + len(baselines) + control) * len(configurations))
        rows: list[dict[str, Any]] = []
        # The split first: profiling ranges need the plain eager loop, i.e. the pipeline before any compile().
        step_split = job.step_split() if "eager" in modes else None
        rate_before = job.dense_rate()  # the machine as the thread rule saw it
        max_graphs = len({(batch, steps) for _, batch, steps in configurations})  # keep every build in the stats
        # blitzdiff_sample with everything but the mode bound: the modes below and the control build through it
        runtime = partial(blitzdiff_sample, pipe, sampler, max_graphs=max_graphs, kernels=config.kernels)
        for mode in modes:
            name, build = f"blitzdiff-{mode}", partial(runtime, mode)
            # eager is the reference: its errors are not caught
            systems.append(job.sweep(name, build(), rows) if mode == "eager" else job.guarded(name, build, rows))
        for baseline in baselines:
            systems.append(job.guarded(baseline, partial(diffusers_sample, pipe, sampler, baseline), rows))
        drift = job.control(rows, partial(runtime, "eager")) if control else None
        interleaved = job.interleaved() if config.interleave else None
        record = run_record(device)  # inside: the device record holds the run's thread count
        roofline = job.roofline(rows, rate_before)  # inside: the dense rate at the run's thread count
    add_speedups(rows)
    meta = {**record, "threads": threads.record(), "model": pipe.name, "sampler": sampler, "dtype": config.dtype,
            "guidance_scale": guidance, "latent_shape": list(pipe.latent_shape(None, None)),
            "batches": list(config.batches), "steps": list(config.steps), "throughput_steps": config.throughput_steps,
            "latency_batch": config.latency_batch, "repeats": config.repeats, "quick": config.quick,
            "channels_last": default_channels_last(device) if config.channels_last is None else config.channels_last,
            "kernels": config.kernels or "ref",
            "unstable_bounds": {"rel_iqr": UNSTABLE_REL_IQR, "max_over_min": UNSTABLE_MAX_OVER_MIN},
            "timing": "wall clock per sampling run, device synchronized before and after; the first call (build) "
                      "and one warm-up call (peak memory) untimed; median, quartiles, min and max of the repeats"}
    warnings = [*threads.warnings(), *measurement_warnings(rows, config.repeats), *roofline_warnings(rows, roofline),
                *control_warnings(drift)]
    return {"meta": meta, "systems": systems, "rows": rows, "step_split": step_split, "roofline": roofline,
            "control": drift, "interleaved": interleaved, "warnings": warnings}


def check_job(pipe, sampler: str, guidance: float) -> None:
    """ValueError now, before anything is measured, for a sampler or guidance scale the pipeline refuses (otherwise
    every system would fail on it, each recorded as an error)."""
    resolve(sampler, pipe.scheduler_config)
    inputs = sample_inputs(pipe, 1, guidance)
    pipe.conditioning(1, inputs.get("class_labels"), inputs.get("encoder_hidden_states"),
                      inputs.get("negative_encoder_hidden_states"), guidance)


@dataclass
class BlitzdiffSample:
    """A Sample by `pipe.sample` (raw output, no progress bar) with `sampler`."""

    pipe: Any
    sampler: str

    def __call__(self, n: int, *, steps: int, **inputs: Any) -> torch.Tensor:
        return self.pipe.sample(n, steps=steps, sampler=self.sampler, output_type="raw", progress=False, **inputs)


def blitzdiff_sample(pipe, sampler: str, mode: str, max_graphs: int, kernels: str | None = None) -> BlitzdiffSample:
    """Sampling through runtime `mode` (a fresh runtime: nothing built), on a shallow copy of `pipe`: the network is
    shared (switched, unless None, to the kernel backend `kernels`), the runtime is the copy's own, so several
    systems can stay alive side by side and `pipe` keeps its own runtime."""
    options = {"max_graphs": max_graphs, "kernels": kernels}
    target = copy.copy(pipe)
    if mode == "compile-loop":
        target.compile(mode="compile", compile_loop=True, **options)
    else:
        target.compile(mode=mode, **options)
    return BlitzdiffSample(target, sampler)


def diffusers_sample(pipe, sampler: str, baseline: str) -> Sample:
    return DiffusersSampler(pipe, sampler, compile="compile" in baseline,
                            channels_last=baseline.endswith("channels-last")).sample


@dataclass
class Job:
    """One bench run's fixed parts: the pipeline, sampler, guidance scale, config and progress log (one line per
    row: `done` of `total`)."""

    pipe: Any
    sampler: str
    guidance: float
    config: BenchConfig
    log: Callable[[str], None]
    total: int
    done: int = 0
    alive: dict[str, Sample] = field(default_factory=dict)  # interleave: each measured system, for Job.interleaved

    @staticmethod
    def configurations(config: BenchConfig) -> list[tuple[str, int, int]]:
        """(kind, batch, steps): throughput over the batch sizes, latency over the step counts."""
        return ([("throughput", b, config.throughput_steps) for b in config.batches]
                + [("latency", config.latency_batch, s) for s in config.steps])

    def sweep(self, name: str, sample: Sample, rows: list[dict[str, Any]], keep: bool = True) -> dict[str, Any]:
        """Measure `sample` on every configuration, appending one row each (a configuration met twice, e.g. the
        throughput batch equal to the latency batch, is measured once); returns the system's record (with a blitzdiff
        runtime's stats). With config.interleave (and `keep`) the sample stays alive for Job.interleaved."""
        measured: dict[tuple[int, int], Measurement] = {}
        build_s = 0.0
        for kind, batch, steps in self.configurations(self.config):
            if (batch, steps) not in measured:
                inputs = sample_inputs(self.pipe, batch, self.guidance)
                run = partial(sample, batch, steps=steps, **inputs)
                measured[batch, steps] = measure(run, self.pipe.device, self.config.repeats)
                build_s += measured[batch, steps].build_s
            rows.append(result_row(name, kind, batch, steps, measured[batch, steps]))
            self.done += 1
            self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {describe_row(rows[-1])}")
        if self.config.interleave and keep:
            self.alive[name] = sample
        record: dict[str, Any] = {"name": name, "status": "ok", "build_s": build_s}
        if isinstance(sample, BlitzdiffSample):
            record["runtime_stats"] = sample.pipe.runtime_stats()
        return record

    def guarded(self, name: str, build: Callable[[], Sample], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """sweep(name, build(), rows), with any failure recorded as the system's error (rows measured before it
        are kept)."""
        try:
            return self.sweep(name, build(), rows)
        except Exception as error:  # a benchmark records what failed and measures the rest
            self.log(f"{name}: failed ({error_line(error)}); recorded, continuing")
            return {"name": name, "status": "error", "error": error_line(error)}

    def control(self, rows: list[dict[str, Any]], build: Callable[[], Sample]) -> dict[str, Any]:
        """blitzdiff-eager measured again after every other system, on a fresh runtime: per configuration its
        median over the first one's (`ratio`), and the largest |ratio - 1| (`max_deviation`). Two measurements of
        one system differ by the machine's drift and noise over the run: a speed-up closer to 1 than that is not
        distinguishable from them in this run."""
        again: list[dict[str, Any]] = []
        try:
            self.sweep("blitzdiff-eager (control)", build(), again, keep=False)
        except Exception as error:  # as guarded: recorded, the measured rows stand
            self.log(f"control: failed ({error_line(error)})")
            return {"system": "blitzdiff-eager", "error": error_line(error)}
        first = {(r["kind"], r["batch"], r["steps"]): r["median_ms"] for r in rows if r["system"] == "blitzdiff-eager"}
        ratios = []
        for r in again:
            first_ms = first[r["kind"], r["batch"], r["steps"]]
            ratios.append({"kind": r["kind"], "batch": r["batch"], "steps": r["steps"], "first_ms": first_ms,
                           "again_ms": r["median_ms"], "ratio": r["median_ms"] / first_ms})
        return {"system": "blitzdiff-eager", "rows": ratios,
                "max_deviation": max(abs(r["ratio"] - 1) for r in ratios)}

    def interleaved(self) -> dict[str, Any]:
        """Every system the sweeps kept (self.alive) timed again, config.repeats rounds per measured (batch, steps),
        one call each per round in rotating order (bench.interleave)."""
        points = list(dict.fromkeys((b, s) for _, b, s in self.configurations(self.config)))
        return interleave(self.alive, points, partial(sample_inputs, self.pipe, guidance_scale=self.guidance),
                          self.config.repeats, self.pipe.device, self.log)

    def step_split(self) -> dict[str, Any]:
        """Network / solver / host ms per step (blitzdiff.profiling) of one run of the plain eager loop (the
        pipeline without compile(): the runtime has no profiling ranges) at the latency batch and the throughput
        step count, or the profiler's error."""
        batch, steps = self.config.latency_batch, self.config.throughput_steps
        record: dict[str, Any] = {"system": "blitzdiff-eager", "batch": batch, "steps": steps}
        try:
            result = profile_sampling(self.pipe, batch, steps=steps, sampler=self.sampler,
                                      **sample_inputs(self.pipe, batch, self.guidance))
        except Exception as error:  # the split is one figure among many
            return {**record, "error": error_line(error)}
        return {**record, "clock": "device time" if result.on_device else "wall time",
                "median": split_summary(result), "per_step": per_step_rows(result)}

    def dense_rate(self) -> dict[str, Any]:
        """bench.roofline.dense_rate on the pipeline's device and dtype, or its error."""
        try:
            return dense_rate(self.pipe.device, self.pipe.dtype)
        except Exception as error:  # one figure among many: the timings stand without it
            return {"error": error_line(error)}

    def roofline(self, rows: list[dict[str, Any]], before: dict[str, Any]) -> dict[str, Any]:
        """The dense rate measured `before` the systems and now, and per (batch, steps) measured the run's network
        FLOPs and floor at the faster of the two (bench.roofline); each row gets its achieved network FLOP/s. An
        error instead when neither rate or the FLOP count could be measured."""
        rates = [before, self.dense_rate()]
        measured = [rate for rate in rates if "error" not in rate]
        if not measured:
            return {"error": rates[-1]["error"], "rates": rates}
        rate = max(measured, key=lambda r: r["best_flops_per_s"])
        try:
            measured_runs = dict.fromkeys((r["batch"], r["steps"]) for r in rows)  # once each, not once per system
            runs = {(batch, steps): run_flops(self.pipe, self.sampler, batch, steps, self.guidance)
                    for batch, steps in measured_runs}
        except Exception as error:  # as above
            return {"error": error_line(error), "rates": rates}
        for row in rows:
            row["network_flops_per_s"] = runs[row["batch"], row["steps"]] / (row["median_ms"] / 1e3)
        return {"rates": rates, "best_flops_per_s": rate["best_flops_per_s"],
                "runs": [{"batch": batch, "steps": steps, "flops": flops, "floor_ms": floor_ms(flops, rate)}
                         for (batch, steps), flops in runs.items()]}


def result_row(system: str, kind: str, batch: int, steps: int, m: Measurement) -> dict[str, Any]:
    """One configuration's row: the times' spread (Measurement.spread), per step and per image figures of the
    median, every timed run, the build call, peak memory, and whether the repeats disagree (`unstable`)."""
    spread = m.spread()
    return {"system": system, "kind": kind, "batch": batch, "steps": steps, **spread,
            "ms_per_step": spread["median_ms"] / steps, "images_per_s": batch / (spread["median_ms"] / 1e3),
            "unstable": m.unstable, "times_ms": list(m.times_ms), "first_call_ms": m.first_call_ms,
            "build_s": m.build_s, "peak_memory_bytes": m.peak_memory_bytes, "peak_total_bytes": m.peak_total_bytes}


def describe_row(row: dict[str, Any]) -> str:
    return (f"{row['system']:<18} {row['kind']:<10} batch {row['batch']:>4} steps {row['steps']:>4}: "
            f"{row['median_ms']:10.2f} ms [{row['min_ms']:.2f}-{row['max_ms']:.2f}] IQR {row['rel_iqr']:.0%}, "
            f"{row['images_per_s']:.1f} images/s, first call {row['first_call_ms']:.0f} ms"
            + (" UNSTABLE" if row["unstable"] else ""))


def measurement_warnings(rows: list[dict[str, Any]], repeats: int) -> list[str]:
    """What makes measured rows untrustworthy: repeats that disagree (a row's `unstable`), a single repeat (no
    spread to judge), a latency that fell as the step count grew (more steps are more work: noise beat it)."""
    unstable = {(r["system"], r["batch"], r["steps"]): r for r in rows if r["unstable"]}  # one per measurement
    found = [f"unstable: {system} batch {batch}, {steps} step{'s' if steps != 1 else ''}: repeats "
             f"{r['min_ms']:.2f}-{r['max_ms']:.2f} ms (slowest / fastest {r['max_over_min']:.2f}, bound "
             f"{UNSTABLE_MAX_OVER_MIN:g}; IQR {r['rel_iqr']:.0%} of the median, bound {UNSTABLE_REL_IQR:.0%})"
             for (system, batch, steps), r in unstable.items()]
    for system in dict.fromkeys(r["system"] for r in rows):
        latency = sorted((r["steps"], r["median_ms"]) for r in rows if (r["system"], r["kind"]) == (system, "latency"))
        found += [f"latency fell: {system} took {ms:.2f} ms for {steps} steps but {shorter_ms:.2f} ms for {fewer} "
                  "steps: more steps are more work, so these figures are noise"
                  for (fewer, shorter_ms), (steps, ms) in pairwise(latency) if ms < shorter_ms]
    if rows and repeats < 2:
        found.append(f"repeats: {repeats} timed run per configuration, so no spread to judge the figures by: use "
                     "--repeats 5 or more for figures")
    return found


def roofline_warnings(rows: list[dict[str, Any]], roofline: dict[str, Any]) -> list[str]:
    """A system faster than the floor: the dense rate was measured low (disturbed), so the floors are not floors."""
    if "error" in roofline:
        return []
    rate = roofline["best_flops_per_s"]
    beaten = {(r["system"], r["batch"], r["steps"]): r for r in rows if r["network_flops_per_s"] > rate}
    return [f"roofline: {system} batch {batch}, {steps} steps ran the network at {r['network_flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s, above the measured dense rate ({rate / 1e9:.1f}): that rate was measured low (a disturbed "
            "measurement or a faster kernel), so this run's floors and speed-up bounds are not bounds"
            for (system, batch, steps), r in beaten.items()]


def control_warnings(control: dict[str, Any] | None) -> list[str]:
    """The control measurement (Job.control) disagreeing with the first beyond UNSTABLE_REL_IQR."""
    if control is None or "error" in control or control["max_deviation"] <= UNSTABLE_REL_IQR:
        return []
    worst = max(control["rows"], key=lambda r: abs(r["ratio"] - 1))
    return [f"control: {control['system']} measured again after every other system took {worst['ratio']:.2f}x its "
            f"first median ({worst['kind']} batch {worst['batch']}, {worst['steps']} steps; bound "
            f"{UNSTABLE_REL_IQR:.0%}): the machine drifted during the run, so speed-ups within "
            f"{control['max_deviation']:.0%} of 1 say nothing"]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each blitzdiff row gets speedup[baseline] = the baseline's median / its own, where the baseline measured the
    same (kind, batch, steps)."""
    medians = {(r["system"], r["kind"], r["batch"], r["steps"]): r["median_ms"] for r in rows
               if r["system"] in BASELINES}
    for row in rows:
        if row["system"].startswith("blitzdiff-"):
            row["speedup"] = {b: medians[b, row["kind"], row["batch"], row["steps"]] / row["median_ms"]
                              for b in BASELINES if (b, row["kind"], row["batch"], row["steps"]) in medians}
