"""`blitzdiff bench` on the embedded models, quick sizes: the JSON holds every row and field with consistent figures,
the speed-ups are the baseline's median over ours, the plots are PNGs, the diffusers baseline computes the same
samples as blitzdiff (so it is the same job), failures of a system are recorded, and CLI errors are one line. The
spread statistics against hand-computed values, the warnings on synthetic times and faked load averages, and the
thread rule on faked cores and load. Timings are recorded, never asserted."""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import blitzdiff
from blitzdiff.bench import (
    BenchConfig,
    CpuThreads,
    DiffusersSampler,
    Measurement,
    bench_config,
    format_results,
    measure,
    run_bench,
    sample_inputs,
)
from blitzdiff.bench import suite as bench_suite
from blitzdiff.bench.measure import PeakMemory, memory_method
from blitzdiff.bench.report import value_range
from blitzdiff.bench.suite import measurement_warnings, planned_systems, result_row
from blitzdiff.bench.threads import rule_threads
from blitzdiff.cli import main
from blitzdiff.engine.pipeline import Pipeline
from blitzdiff.malloc import malloc_record
from blitzdiff.models import layers
from blitzdiff.models.presets import build_random

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS = {"system", "kind", "batch", "steps", "min_ms", "q25_ms", "median_ms", "q75_ms", "max_ms", "rel_iqr",
              "max_over_min", "unstable", "ms_per_step", "images_per_s", "times_ms", "first_call_ms", "build_s",
              "peak_memory_bytes", "peak_total_bytes"}
THREAD_FIELDS = {"count", "requested", "rule", "torch_default", "usable_cores", "load_before", "load_after",
                 "others_load_after", "own_busy_threads", "wall_s"}
CPU = torch.device("cpu")
bench_measure = importlib.import_module("blitzdiff.bench.measure")  # blitzdiff.bench.measure is the function


def test_bench_json_rows_fields_speedups_and_plots(tmp_path, capsys):
    report, plots = tmp_path / "bench.json", tmp_path / "plots"
    args = ["bench", "--model", "unet-digits", "--sampler", "ddim", "--quick", "--json",
            str(report), "--plots", str(plots)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "diffusers / eager" in printed and "blitzdiff-graph: skipped" in printed
    # 2 systems and the control (eager again) x 4 configurations
    progress = [line[:line.index("]") + 1] for line in printed.splitlines() if line.startswith("[")]
    assert progress == [f"[{i:>2}/12]" for i in range(1, 13)]
    results = json.loads(report.read_text())

    meta = results["meta"]
    assert meta["command"] and meta["date"] and meta["model"] == "unet-digits" and meta["sampler"] == "ddim"
    threads = meta["threads"]
    assert set(threads) == THREAD_FIELDS and threads["requested"] is None and threads["usable_cores"] >= 1
    assert meta["device"]["type"] == "cpu" and meta["device"]["torch_threads"] == threads["count"] >= 1
    assert f"torch threads: {threads['count']} (by the rule" in printed
    assert meta["unstable_bounds"] == {"rel_iqr": 0.1, "max_over_min": 1.5}
    assert {"torch", "diffusers", "triton", "blitzdiff", "python"} <= set(meta["versions"])
    assert meta["memory"]["method"] == memory_method(CPU) and meta["repeats"] == 3
    assert meta["malloc"] == malloc_record() and meta["malloc"]["tuned"] is True  # the CLI tuned it
    assert "malloc tuned (mmap threshold 32 MiB, trim threshold 1024 MiB)" in printed
    status = {s["name"]: s["status"] for s in results["systems"]}
    assert status == {"blitzdiff-graph": "skipped", "blitzdiff-eager": "ok", "diffusers": "ok"}  # quick defaults
    runtime = next(s for s in results["systems"] if s["name"] == "blitzdiff-eager")["runtime_stats"]
    assert runtime["mode"] == "eager" and len(runtime["entries"]) == 3  # keys: batch 1 / 2 at 2 steps, 1 at 1 step

    expected = {("throughput", 1, 2), ("throughput", 2, 2), ("latency", 1, 1), ("latency", 1, 2)}
    medians = {}
    for system in ("blitzdiff-eager", "diffusers"):
        rows = [r for r in results["rows"] if r["system"] == system]
        assert {(r["kind"], r["batch"], r["steps"]) for r in rows} == expected and len(rows) == len(expected)
        for r in rows:
            assert ROW_FIELDS <= set(r), set(r)
            assert len(r["times_ms"]) == 3 and r["median_ms"] == statistics.median(r["times_ms"]) > 0
            q25, q75 = np.percentile(r["times_ms"], [25, 75])  # an independent implementation of the quartiles
            assert (r["min_ms"], r["max_ms"]) == (min(r["times_ms"]), max(r["times_ms"]))
            assert (r["q25_ms"], r["q75_ms"]) == (pytest.approx(q25), pytest.approx(q75))
            assert r["rel_iqr"] == pytest.approx((q75 - q25) / r["median_ms"])
            spread = max(r["times_ms"]) / min(r["times_ms"])
            assert r["unstable"] == ((q75 - q25) / r["median_ms"] > 0.1 or spread > 1.5)
            if r["unstable"]:
                assert any(w.startswith(f"unstable: {system} batch {r['batch']}, ") for w in results["warnings"])
            assert r["ms_per_step"] == pytest.approx(r["median_ms"] / r["steps"])
            assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
            assert r["build_s"] == pytest.approx(max(r["first_call_ms"] - r["median_ms"], 0) / 1e3)
            assert r["peak_total_bytes"] >= r["peak_memory_bytes"] >= 0
            medians[system, r["kind"], r["batch"], r["steps"]] = r["median_ms"]
    for r in results["rows"]:
        if r["system"] == "blitzdiff-eager":
            baseline = medians["diffusers", r["kind"], r["batch"], r["steps"]]
            assert r["speedup"] == {"diffusers": pytest.approx(baseline / r["median_ms"], rel=1e-12)}
        else:
            assert "speedup" not in r

    split = results["step_split"]
    assert split["system"] == "blitzdiff-eager" and (split["batch"], split["steps"]) == (1, 2)
    assert [row["step"] for row in split["per_step"]] == [0, 1]  # ddim: one stage per step
    assert {"network_ms", "solver_ms", "host_ms", "step_ms"} <= set(split["median"])

    pngs = sorted(plots.iterdir())
    assert [p.name for p in pngs] == ["unet-digits-ddim-cpu-latency-vs-steps.png",
                                      "unet-digits-ddim-cpu-throughput-vs-batch.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100


def test_onnxruntime_mode_is_measured_beside_eager(tmp_path, capsys):
    report = tmp_path / "bench.json"
    args = ["bench", "--model", "unet-digits", "--quick", "--modes", "eager", "onnxruntime", "--baseline", "none",
            "--batches", "2", "--steps", "2", "--repeats", "1", "--json", str(report)]
    assert main(args) == 0
    results = json.loads(report.read_text())
    ort = next(s for s in results["systems"] if s["name"] == "blitzdiff-onnxruntime")
    assert ort["status"] == "ok" and ort["runtime_stats"]["mode"] == "onnxruntime"
    network = ort["runtime_stats"]["network"]
    assert network["providers"] == ["CPUExecutionProvider"]
    assert network["threads"] == results["meta"]["threads"]["count"]  # ONNX Runtime on the run's own thread count
    systems = ("blitzdiff-eager", "blitzdiff-onnxruntime")
    assert {(r["system"], r["batch"]) for r in results["rows"]} == {(s, b) for s in systems for b in (1, 2)}
    assert "export and load" in capsys.readouterr().out  # the export, done by compile(), is reported


def test_kernels_option_switches_the_network_and_is_recorded(tmp_path, monkeypatch):
    # --kernels reaches Pipeline.compile (the model's kernel modules run that backend) and the JSON says which.
    seen = []
    compile_ = Pipeline.compile

    def recording(self, *args, **kwargs):
        result = compile_(self, *args, **kwargs)
        seen.append({m.backend for m in self.model.modules() if hasattr(m, "backend")})
        return result

    monkeypatch.setattr(Pipeline, "compile", recording)
    report = tmp_path / "bench.json"
    args = ["bench", "--model", "dit-digits", "--quick", "--modes", "eager", "--baseline", "none", "--batches", "1",
            "--steps", "1", "--repeats", "1", "--kernels", "auto", "--json", str(report)]
    assert main(args) == 0
    assert seen == [{"auto"}]
    assert json.loads(report.read_text())["meta"]["kernels"] == "auto"


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--channels-last"], True),
                                              (["--no-channels-last"], False)])
def test_channels_last_flag_loads_the_network_so_and_is_recorded(tmp_path, monkeypatch, flag, expected):
    # unet-digits' convolution weights, as the blitzdiff modes run them: the CPU default (channels-last) or the flag's
    seen = []
    compile_ = Pipeline.compile

    def recording(self, *args, **kwargs):
        result = compile_(self, *args, **kwargs)
        seen.append({p.is_contiguous() for p in self.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and
                     p.shape[-2:].numel() > 1})  # a 1x1 kernel is both
        return result

    monkeypatch.setattr(Pipeline, "compile", recording)
    report = tmp_path / "bench.json"
    args = ["bench", "--model", "unet-digits", "--quick", "--modes", "eager", "--baseline", "none", "--batches", "1",
            "--steps", "1", "--repeats", "1", *flag, "--json", str(report)]
    assert main(args) == 0
    assert seen == [{not expected}]
    assert json.loads(report.read_text())["meta"]["channels_last"] is expected


def tiny_learned_sigma_dit() -> Pipeline:
    """A random-weight DiT whose output holds the prediction and then the learned variance (out_channels 2)."""
    config = {**blitzdiff.load("dit-digits").model.config, "num_layers": 2, "out_channels": 2, "sample_size": 8}
    scheduler = blitzdiff.load("dit-digits").scheduler_config
    return Pipeline(build_random("DiTTransformer2DModel", config, seed=3), scheduler, name="tiny-dit-learned-sigma")


@pytest.mark.parametrize(("model", "sampler", "guidance"), [
    ("unet-digits", "ddim", 1.0),
    ("dit-digits", "dpmpp_2m", 4.0),  # classifier-free guidance with the null class
    ("learned-sigma", "unipc", 3.0),  # the variance channels split off on both sides
])
def test_diffusers_baseline_computes_blitzdiffs_samples(model, sampler, guidance):
    pipe = tiny_learned_sigma_dit() if model == "learned-sigma" else blitzdiff.load(model)
    inputs = sample_inputs(pipe, 3, guidance)
    ours = pipe.sample(3, steps=6, sampler=sampler, output_type="raw", progress=False, **inputs)
    theirs = DiffusersSampler(pipe, sampler).sample(3, steps=6, **inputs)
    assert theirs.shape == ours.shape == (3, *pipe.latent_shape(None, None))
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() < 1e-4
    channels_last = DiffusersSampler(pipe, sampler, channels_last=True)
    if model == "unet-digits":
        assert next(p for p in channels_last.model.parameters() if p.dim() == 4).is_contiguous(
            memory_format=torch.channels_last)
    theirs = channels_last.sample(3, steps=6, **inputs)
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() < 1e-4
    assert (ours - inputs["noise"]).abs().max() > 0.1  # the loop did something


def test_measure_excludes_the_first_call_and_warm_up():
    calls = []

    def run():
        calls.append(len(calls))
        if len(calls) == 1:
            time.sleep(0.05)  # a slow first call: the "build"

    m = measure(run, CPU, repeats=3)
    assert len(calls) == 1 + 1 + 3 and len(m.times_ms) == 3  # build call, memory warm-up, timed repeats
    assert m.first_call_ms >= 50 and m.build_s > 0.02 and max(m.times_ms) < m.first_call_ms


def test_peak_memory_sees_a_transient_allocation():
    if memory_method(CPU) != "rss_hwm_reset":
        pytest.skip("needs Linux's resettable peak RSS (/proc/self/clear_refs)")
    # Heap history as a long test session leaves it: 2048 tensors of 64 KiB (below glibc's mmap threshold, so on
    # the heap) freed behind a live one stay resident in malloc's bins, and a 64 MiB tensor reuses those pages.
    # Without handing them back first, the probe saw a 4 MiB rise (CI, after ~4000 tests).
    churn = [torch.ones(16 * 2**10) for _ in range(2048)]
    live = torch.ones(16 * 2**10)
    del churn
    with PeakMemory(CPU) as probe:
        torch.ones(16 * 2**20).sum()  # 64 MiB, touched, then freed
    assert probe.peak_bytes >= 60 * 2**20 and probe.peak_total_bytes >= probe.peak_bytes
    del live


def test_a_failing_system_is_recorded_and_the_rest_measured(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    config = bench_config(quick=True, model="unet-digits", baseline=["diffusers", "diffusers-compile"], modes=None,
                          steps=[1], batches=[1])
    results = run_bench(config, log=lambda line: None)
    systems = {s["name"]: s for s in results["systems"]}
    assert systems["diffusers-compile"] == {"name": "diffusers-compile", "status": "error",
                                            "error": "RuntimeError: no compiler here"}
    assert systems["diffusers"]["status"] == systems["blitzdiff-eager"]["status"] == "ok"
    assert {r["system"] for r in results["rows"]} == {"blitzdiff-eager", "diffusers"}


def test_defaults_skip_cuda_only_modes_off_cuda_and_options_resolve():
    modes, baselines, skipped = planned_systems(bench_config(), CPU)
    assert modes == ["eager", "compile"] and baselines == ["diffusers", "diffusers-compile"]
    assert [s["name"] for s in skipped] == ["blitzdiff-graph"]
    _, baselines, _ = planned_systems(bench_config(baseline=["diffusers-compile-channels-last", "diffusers"]), CPU)
    assert baselines == ["diffusers", "diffusers-compile-channels-last"]
    modes, baselines, _ = planned_systems(bench_config(modes=["compile", "eager"], baseline=["none"]), CPU)
    assert modes == ["eager", "compile"] and baselines == []  # eager is always measured first
    quick = bench_config(quick=True, repeats=4)
    assert (quick.batches, quick.steps, quick.throughput_steps, quick.repeats) == ((1, 2), (1, 2), 2, 4)
    assert BenchConfig().batches == (1, 4, 16) and BenchConfig().steps == (1, 2, 4, 8, 20, 50)
    assert bench_config(batches=[4, 4, 1]).batches == (4, 1)  # a configuration is measured once


@pytest.mark.parametrize(("args", "message"), [
    (["--modes", "graph"], "graph need --device cuda (CUDA graphs, TensorRT)"),
    (["--modes", "eager", "turbo"], "unknown mode(s) ['turbo']"),
    (["--batches", "4", "0"], "batch sizes must be ints >= 1, got [4, 0]"),
    (["--baseline", "none", "diffusers"], "unknown baseline(s) ['none']"),
    (["--modes", "compile", "--sampler", "plms"], "unknown sampler 'plms'"),  # refused before any system runs
    (["--modes", "compile", "--guidance", "3"], "needs a conditional model"),
    (["--threads", "0"], "threads must be an int >= 1"),
    (["--kernels", "cpu"], "kernel backend 'cpu' is not available for every layer of UNet2DModel: "
                           "blitzdiff.models.layers.Attention takes ref, triton, cuda, auto"),
])
def test_cli_errors_are_one_line(args, message, capsys, monkeypatch):
    # every shipped layer takes every backend: a layer without a "cpu" kernel is played by attention here
    monkeypatch.setattr(layers.Attention, "KERNEL_BACKENDS", ("ref", "triton", "cuda", "auto"))
    monkeypatch.setattr(bench_suite.Job, "step_split", lambda self: pytest.fail("profiled before refusing"))
    assert main(["bench", "--model", "unet-digits", "--quick", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blitzdiff bench: error: ") and message in lines[0], captured.err
    assert "throughput" not in captured.out  # refused before measuring anything


@pytest.mark.parametrize(("times", "spread", "unstable"), [
    # sorted 10 11 12 13 30: quartiles at positions 1 and 3 of 0..4 (linear between order statistics)
    ((12, 30, 10, 13, 11), {"min_ms": 10, "q25_ms": 11, "median_ms": 12, "q75_ms": 13, "max_ms": 30,
                            "rel_iqr": 2 / 12, "max_over_min": 3.0}, True),
    # IQR 2 / 12 = 17% > 10%, slowest / fastest 1.4 <= 1.5: unstable by the IQR alone
    ((10, 11, 12, 13, 14), {"min_ms": 10, "q25_ms": 11, "median_ms": 12, "q75_ms": 13, "max_ms": 14,
                            "rel_iqr": 2 / 12, "max_over_min": 1.4}, True),
    # IQR 0, slowest / fastest 1.6 > 1.5: unstable by the range alone
    ((100, 100, 160, 100, 100), {"min_ms": 100, "q25_ms": 100, "median_ms": 100, "q75_ms": 100, "max_ms": 160,
                                 "rel_iqr": 0.0, "max_over_min": 1.6}, True),
    # exactly at the range bound (1.5) is not beyond it; positions 1.25 and 3.75 of 0..5 both land on 100
    ((100, 100, 100, 100, 100, 150), {"min_ms": 100, "q25_ms": 100, "median_ms": 100, "q75_ms": 100, "max_ms": 150,
                                      "rel_iqr": 0.0, "max_over_min": 1.5}, False),
    # an even count: positions 0.75 and 2.25 of 0..3 -> 17.5 and 32.5, median 25
    ((40, 10, 30, 20), {"min_ms": 10, "q25_ms": 17.5, "median_ms": 25, "q75_ms": 32.5, "max_ms": 40,
                        "rel_iqr": 15 / 25, "max_over_min": 4.0}, True),
    ((100, 104, 101, 103, 102), {"min_ms": 100, "q25_ms": 101, "median_ms": 102, "q75_ms": 103, "max_ms": 104,
                                 "rel_iqr": 2 / 102, "max_over_min": 1.04}, False),
    ((7,), {"min_ms": 7, "q25_ms": 7, "median_ms": 7, "q75_ms": 7, "max_ms": 7, "rel_iqr": 0.0,
            "max_over_min": 1.0}, False),
])
def test_spread_against_hand_computed_values(times, spread, unstable):
    m = Measurement(50.0, tuple(float(t) for t in times), 0, 0)
    assert m.spread() == pytest.approx(spread, rel=1e-12) and m.unstable is unstable
    row = result_row("blitzdiff-eager", "latency", 2, 4, m)
    assert {key: row[key] for key in spread} == pytest.approx(spread, rel=1e-12) and row["unstable"] is unstable
    low, high = spread["min_ms"], spread["max_ms"]  # batch 2: images/s from the slowest and the fastest repeat
    assert value_range(row, "images_per_s") == pytest.approx((2e3 / spread["median_ms"], 2e3 / high, 2e3 / low))
    assert value_range(row, "median_ms") == (spread["median_ms"], low, high)


def rows_of(system: str, times_by_steps: dict[int, tuple[float, ...]]) -> list[dict]:
    return [result_row(system, "latency", 1, steps, Measurement(0.0, times, 0, 0))
            for steps, times in times_by_steps.items()]


def test_measurement_warnings_fire_for_spread_falling_latency_and_one_repeat_only():
    tight = rows_of("blitzdiff-eager", {1: (10.0, 10.1, 10.2), 4: (40.0, 40.4, 40.2)})
    assert measurement_warnings(tight, repeats=3) == []
    wide = rows_of("diffusers", {1: (10.0, 10.1, 30.0), 4: (40.0, 40.4, 40.2)})
    assert measurement_warnings(wide, repeats=3) == [
        "unstable: diffusers batch 1, 1 step: repeats 10.00-30.00 ms (slowest / fastest 3.00, bound 1.5; IQR 99% of "
        "the median, bound 10%)"]
    # the issue's symptom: diffusers' latency dropped from 2 to 8 steps
    fell = rows_of("diffusers", {2: (200.0, 201.0, 202.0), 8: (100.0, 101.0, 102.0)})
    assert [w.split(":")[0] for w in measurement_warnings(fell, repeats=3)] == ["latency fell"]
    assert "diffusers took 101.00 ms for 8 steps but 201.00 ms for 2 steps" in measurement_warnings(fell, 3)[0]
    single = rows_of("blitzdiff-eager", {1: (10.0,), 4: (40.0,)})
    assert [w.split(":")[0] for w in measurement_warnings(single, repeats=1)] == ["repeats"]


@pytest.fixture
def machine(monkeypatch):
    """Fake usable cores and a fake 1-minute load average (a sequence: one value per os.getloadavg call, the last
    one repeated)."""
    state = {"loads": [0.0]}

    def getloadavg():
        load = state["loads"].pop(0) if len(state["loads"]) > 1 else state["loads"][0]
        return load, load, load

    def set_machine(cores: int, *loads: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        state["loads"] = list(loads)

    monkeypatch.setattr(os, "getloadavg", getloadavg)
    return set_machine


@pytest.mark.parametrize(("cores", "load", "torch_default", "threads"), [
    (2, 0.0, 2, 2), (2, 0.4, 2, 2), (2, 0.5, 2, 1), (2, 1.06, 2, 1), (2, 3.9, 2, 1), (2, None, 2, 2),
    (16, 3.4, 8, 8), (16, 9.6, 8, 6), (16, 15.5, 8, 1), (4, 1.0, 1, 1),
])
def test_thread_rule(cores, load, torch_default, threads):
    assert rule_threads(cores, load, torch_default) == threads


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for a test (restored after); the CI machine has 2 cores, so keep it small."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "load", "requested", "inside"), [
    (8, 5.4, None, 3),  # the others keep 5 of 8 cores busy
    (8, 1.2, None, 4),  # torch's default (4) is the cap
    (8, 7.7, None, 1),  # at least 1
    (8, 7.7, 2, 2),  # an explicit count wins
])
def test_cpu_threads_applies_the_rule_records_it_and_restores(machine, torch_threads, cores, load, requested, inside):
    torch_threads(4)
    machine(cores, load, 0.25)
    with CpuThreads(requested) as threads:
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 4
    record = threads.record()
    assert set(record) == THREAD_FIELDS and record["count"] == inside and record["requested"] == requested
    assert (record["usable_cores"], record["torch_default"]) == (cores, 4)
    assert (record["load_before"], record["load_after"]) == (load, 0.25)
    assert record["rule"] == ("requested" if requested else blitzdiff.bench.THREAD_RULE)


@pytest.mark.parametrize(("cores", "loads", "requested", "when"), [
    (2, (0.2, 0.3), None, None),  # idle: 2 threads on 2 cores
    (2, (3.9, 3.9), None, "before the run and"),  # loaded throughout: even 1 thread competes
    (2, (0.2, 3.0), None, "during the run"),  # another job started during the run
    (2, (0.2, 0.3), 3, "before the run and"),  # an explicit count beyond the cores
    (4, (1.3, 1.3), None, None),  # 3 threads beside one busy core
])
def test_load_warnings(machine, torch_threads, cores, loads, requested, when):
    torch_threads(cores)
    machine(cores, *loads)
    with CpuThreads(requested) as threads:
        pass
    warnings = threads.warnings()
    if when is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("load: ") and when in warnings[0]
        assert f"on {cores} usable cores: the CPU was oversubscribed" in warnings[0]


@pytest.mark.parametrize(("load_after", "warned"), [(2.05, False), (3.2, True)])
def test_the_runs_own_threads_are_not_counted_as_other_load(machine, torch_threads, monkeypatch, load_after, warned):
    # A 10-minute run keeping both cores busy lifts the load average to ~2 by itself (2 * (1 - e^-10) = 2.0):
    # only what is left beyond it is other work.
    clock = iter([0.0, 600.0])  # perf_counter at enter and exit
    cpu = iter([0.0, 1200.0])  # own_cpu_seconds: 2 busy threads over the 600 s
    monkeypatch.setattr(blitzdiff.bench.threads, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(blitzdiff.bench.threads, "own_cpu_seconds", lambda: next(cpu))
    torch_threads(2)
    machine(2, 0.0, load_after)
    with CpuThreads() as threads:
        pass
    assert threads.record()["own_busy_threads"] == 2.0
    assert threads.others_load_after() == pytest.approx(load_after - 2 * (1 - np.exp(-10)))
    assert bool(threads.warnings()) is warned


def test_the_runs_child_processes_count_as_its_own_work(torch_threads):
    # a script timing fresh processes (benchmarks/bench_cpu_default_path.py) is busy in its children, not in itself
    torch_threads(2)
    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    with CpuThreads(1) as threads:
        subprocess.run([sys.executable, "-c", busy], check=True)
    assert threads.record()["own_busy_threads"] > 0.5


def synthetic(times: tuple[float, ...]):
    """A stand-in for measure.measure: every configuration 'took' `times`."""
    return lambda run, device, repeats: Measurement(times[0], times, 0, 0)


@pytest.mark.parametrize(("times", "load", "expected"), [
    ((10.0, 10.2, 10.1), 0.0, []),
    ((10.0, 10.2, 25.0), 0.0, ["unstable"] * 6),  # 2 systems x (batch 1 and 2 at 2 steps, batch 1 at 1 step)
    ((10.0, 10.2, 10.1), 3.9, ["load"]),
])
def test_run_bench_warns_loudly(machine, torch_threads, monkeypatch, times, load, expected):
    torch_threads(2)
    machine(2, load)
    monkeypatch.setattr(bench_suite, "measure", synthetic(times))
    lines = []
    results = run_bench(bench_config(quick=True, model="unet-digits", repeats=3, threads=None), log=lines.append)
    assert torch.get_num_threads() == 2
    assert [w.split(":")[0] for w in results["warnings"]] == expected
    assert all(r["unstable"] is (expected[:1] == ["unstable"]) for r in results["rows"])
    assert results["meta"]["threads"]["count"] == results["meta"]["device"]["torch_threads"] == (1 if load else 2)
    assert lines[0].startswith(f"torch threads: {1 if load else 2} (by the rule")
    report = format_results(results)
    if expected:
        block = report[report.index("WARNING: these figures may be wrong"):]
        assert all(f"  - {w}" in block for w in results["warnings"])
    else:
        assert "WARNING" not in report
    # latency cells: median 10.2, quartiles 10.1 and 17.6, so IQR 7.5 / 10.2 = 74%
    assert ("10.20 [10.00-25.00] ±74%!" in report) is (expected[:1] == ["unstable"])


def drifting(after_calls: int, factor: float):
    """A stand-in for measure.measure: 10 ms per run, `factor` times that from call `after_calls` on."""
    calls = []

    def fake(run, device, repeats):
        calls.append(None)
        ms = 10.0 * (factor if len(calls) > after_calls else 1.0)
        return Measurement(ms, (ms,) * repeats, 0, 0)

    return fake


@pytest.mark.parametrize(("factor", "warned"), [(1.0, False), (1.05, False), (1.3, True)])
def test_control_measures_eager_again_and_warns_on_drift(machine, torch_threads, monkeypatch, factor, warned):
    # quick: eager and diffusers, 3 measured (batch, steps) each; the control's 3 come after them, `factor` slower
    torch_threads(2)
    machine(2, 0.0)
    monkeypatch.setattr(bench_suite, "measure", drifting(6, factor))
    results = run_bench(bench_config(quick=True, model="unet-digits", threads=None), log=lambda line: None)
    control = results["control"]
    first = {(r["kind"], r["batch"], r["steps"]): r["median_ms"] for r in results["rows"]
             if r["system"] == "blitzdiff-eager"}
    assert {(r["kind"], r["batch"], r["steps"]) for r in control["rows"]} == set(first)
    assert all(r["first_ms"] == first[r["kind"], r["batch"], r["steps"]] == 10.0 for r in control["rows"])
    assert all(r["again_ms"] == pytest.approx(10.0 * factor) for r in control["rows"])
    assert control["max_deviation"] == pytest.approx(factor - 1)
    assert {r["system"] for r in results["rows"]} == {"blitzdiff-eager", "diffusers"}  # the control is no system
    assert any(w.startswith("control: blitzdiff-eager measured again") for w in results["warnings"]) is warned
    assert f"speed-ups within {factor - 1:.0%} of 1 are within this run's drift" in format_results(results)


def test_no_control_without_a_second_system_or_when_turned_off(monkeypatch):
    monkeypatch.setattr(bench_suite, "measure", synthetic((10.0, 10.0, 10.0)))
    for options in ({"baseline": ["none"]}, {"control": False}):
        results = run_bench(bench_config(quick=True, model="unet-digits", **options), log=lambda line: None)
        assert results["control"] is None and "control:" not in format_results(results)
    assert bench_config(quick=True, model="unet-digits").control is True


def test_bench_config_takes_the_cli_names():
    config = bench_config(baseline=["diffusers"], threads=1)
    assert (config.baseline, config.threads) == (("diffusers",), 1)
    with pytest.raises(ValueError, match=r"unknown bench option\(s\) \['baselines'\]; allowed: model, .*baseline"):
        bench_config(baselines=["diffusers"])


def test_interleaved_speedups_see_through_drift_that_fools_the_sweeps(machine, torch_threads, monkeypatch):
    # Stand-in systems on a fake clock that slows 2% per call: diffusers truly takes 1.3x eager's time. The sweeps
    # (eager's calls first, diffusers' later) credit eager with the drift; the interleaved rounds must not.
    torch_threads(2)
    machine(2, 0.0)
    clock, calls, order = [0.0], [0], []

    def system(name: str, cost_ms: float):
        def sample(n, *, steps, **inputs):
            calls[0] += 1
            order.append(name)
            clock[0] += cost_ms * 1.02 ** calls[0] / 1e3
        return sample

    monkeypatch.setattr(bench_measure, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench_suite, "blitzdiff_sample", lambda pipe, sampler, mode, **options: system(mode, 10.0))
    monkeypatch.setattr(bench_suite, "diffusers_sample", lambda pipe, sampler, baseline: system(baseline, 13.0))
    results = run_bench(bench_config(quick=True, model="unet-digits", repeats=4, threads=None, interleave=True),
                        log=lambda line: None)
    sweeps = {r["system"]: r["median_ms"] for r in results["rows"] if (r["batch"], r["steps"]) == (2, 2)}
    assert sweeps["diffusers"] / sweeps["blitzdiff-eager"] > 1.3 * 1.1  # the drift the sweeps took for speed
    interleaved = results["interleaved"]
    assert [(c["batch"], c["steps"]) for c in interleaved["configurations"]] == [(1, 2), (2, 2), (1, 1)]
    for configuration in interleaved["configurations"]:
        [ratio] = configuration["ratios"]
        assert (ratio["system"], ratio["baseline"]) == ("blitzdiff-eager", "diffusers")
        assert ratio["q25"] <= ratio["median"] <= ratio["q75"]
        assert ratio["median"] == pytest.approx(1.3, rel=0.025)
        assert set(configuration["median_ms"]) == {"blitzdiff-eager", "diffusers"}
    # the rounds alternate, the first system rotating: eager first, then diffusers, ... (12 rounds of 2 calls)
    rounds = order[-24:]
    assert [rounds[i] for i in range(0, 24, 2)] == ["eager", "diffusers"] * 6
    assert "interleaved: every system timed again" in format_results(results)
    assert "1.3" in format_results(results).split("interleaved:")[1]


def test_interleave_keeps_each_runtime_apart_and_records_a_failure(monkeypatch):
    # real eager sampling (tiny sizes; the sweeps' measure a stand-in) and a baseline that fails when interleaved
    monkeypatch.setattr(bench_suite, "measure", synthetic((10.0, 10.0, 10.0)))

    def failing(pipe, sampler, baseline):
        def sample(n, *, steps, **inputs):
            raise RuntimeError("out of memory")
        return sample

    monkeypatch.setattr(bench_suite, "diffusers_sample", failing)
    loaded, load = [], bench_suite.load
    monkeypatch.setattr(bench_suite, "load", lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[0])
    kept, interleave = [], bench_suite.Job.interleaved
    monkeypatch.setattr(bench_suite.Job, "interleaved", lambda job: kept.append(dict(job.alive)) or interleave(job))
    results = run_bench(bench_config(quick=True, model="unet-digits", interleave=True), log=lambda line: None)
    interleaved = results["interleaved"]
    assert interleaved["errors"] == {"diffusers": "RuntimeError: out of memory"}
    first, *rest = interleaved["configurations"]
    assert len(first["times_ms"]["blitzdiff-eager"]) == 3 and "diffusers" not in first["times_ms"]
    assert all(set(c["times_ms"]) == {"blitzdiff-eager"} and c["ratios"] == [] for c in rest)
    assert "diffusers: failed while interleaved (RuntimeError: out of memory)" in format_results(results)
    [alive] = kept
    eager = alive["blitzdiff-eager"].pipe  # the mode's own copy of the pipeline: same network, own runtime
    assert eager is not loaded[0] and eager.model is loaded[0].model
    assert eager.runtime.mode == "eager" and loaded[0].runtime is None
    assert bench_config(quick=True).interleave is False
