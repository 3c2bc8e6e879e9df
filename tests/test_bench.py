"""`blitzdiff bench` on the embedded models, quick sizes: the JSON holds every row and field with consistent figures,
the speed-ups are the baseline's median over ours, the plots are PNGs, the diffusers baseline computes the same
samples as blitzdiff (so it is the same job), failures of a system are recorded, and CLI errors are one line.
Timings are recorded, never asserted."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch
from PIL import Image

import blitzdiff
from blitzdiff.bench import BenchConfig, DiffusersSampler, bench_config, measure, run_bench, sample_inputs
from blitzdiff.bench.measure import PeakMemory, memory_method
from blitzdiff.bench.suite import planned_systems
from blitzdiff.cli import main
from blitzdiff.engine.pipeline import Pipeline
from blitzdiff.models.presets import build_random

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS = {"system", "kind", "batch", "steps", "median_ms", "ms_per_step", "images_per_s", "times_ms",
              "first_call_ms", "build_s", "peak_memory_bytes", "peak_total_bytes"}
CPU = torch.device("cpu")


def test_bench_json_rows_fields_speedups_and_plots(tmp_path, capsys):
    report, plots = tmp_path / "bench.json", tmp_path / "plots"
    args = ["bench", "--model", "unet-digits", "--sampler", "ddim", "--quick", "--repeats", "3", "--json",
            str(report), "--plots", str(plots)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "diffusers / eager" in printed and "blitzdiff-graph: skipped" in printed
    results = json.loads(report.read_text())

    meta = results["meta"]
    assert meta["command"] and meta["date"] and meta["model"] == "unet-digits" and meta["sampler"] == "ddim"
    assert meta["device"]["type"] == "cpu" and meta["device"]["torch_threads"] == torch.get_num_threads()
    assert {"torch", "diffusers", "triton", "blitzdiff", "python"} <= set(meta["versions"])
    assert meta["memory"]["method"] == memory_method(CPU) and meta["repeats"] == 3
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
    with PeakMemory(CPU) as probe:
        torch.ones(16 * 2**20).sum()  # 64 MiB, touched, then freed
    assert probe.peak_bytes >= 60 * 2**20 and probe.peak_total_bytes >= probe.peak_bytes


def test_a_failing_system_is_recorded_and_the_rest_measured(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    config = bench_config(quick=True, model="unet-digits", baselines=["diffusers", "diffusers-compile"], modes=None,
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
    modes, baselines, _ = planned_systems(bench_config(modes=["compile", "eager"], baselines=["none"]), CPU)
    assert modes == ["eager", "compile"] and baselines == []  # eager is always measured first
    quick = bench_config(quick=True, repeats=4)
    assert (quick.batches, quick.steps, quick.throughput_steps, quick.repeats) == ((1, 2), (1, 2), 2, 4)
    assert BenchConfig().batches == (1, 4, 16) and BenchConfig().steps == (1, 2, 4, 8, 20, 50)
    assert bench_config(batches=[4, 4, 1]).batches == (4, 1)  # a configuration is measured once


@pytest.mark.parametrize(("args", "message"), [
    (["--modes", "graph"], "graph capture CUDA graphs and need --device cuda"),
    (["--modes", "eager", "turbo"], "unknown mode(s) ['turbo']"),
    (["--batches", "4", "0"], "batch sizes must be ints >= 1, got [4, 0]"),
    (["--baseline", "none", "diffusers"], "unknown baseline(s) ['none']"),
    (["--modes", "compile", "--sampler", "plms"], "unknown sampler 'plms'"),  # refused before any system runs
    (["--modes", "compile", "--guidance", "3"], "needs a conditional model"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(["bench", "--model", "unet-digits", "--quick", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blitzdiff bench: error: ") and message in lines[0], captured.err
    assert "throughput" not in captured.out  # refused before measuring anything
