"""bench.roofline: a run's network FLOPs (against a hand count of the DiT's matmuls), the GEMM rate, and the floor /
speed-up bound columns of bench's report."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import blitzdiff
from blitzdiff.bench import format_results, roofline
from blitzdiff.bench import suite as bench_suite
from blitzdiff.bench.roofline import dense_rate, floor_ms, network_flops, run_flops
from blitzdiff.bench.suite import roofline_warnings


def dit_flops_by_hand(config: dict, batch: int) -> int:
    """Matmul / conv FLOPs (2 per multiply-add) of blitzdiff's DiT on `batch` inputs, from its structure (dit.py):
    patchify conv; per block its own timestep MLP (256 -> D -> D) and adaLN linear (D -> 6D) on [B, D], q, k, v, o
    projections, QK^T and AV over N tokens, and the 4x MLP; the final layer's adaLN (D -> 2D, on block 0's
    conditioning) and projection to p^2 * out_channels per token."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, c_in, c_out = config["patch_size"], config["in_channels"], config["out_channels"]
    n = (config["sample_size"] // p) ** 2
    patchify = 2 * n * d * c_in * p * p
    conditioning = 2 * (256 * d + d * d) + 2 * d * 6 * d
    tokens = 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * 4 * d
    final = 2 * d * 2 * d + 2 * n * d * p * p * c_out
    return batch * (patchify + config["num_layers"] * (conditioning + tokens) + final)


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_flops_match_a_hand_count(batch):
    pipe = blitzdiff.load("dit-digits")
    assert network_flops(pipe, batch) == dit_flops_by_hand(pipe.model.config, batch)


def dense_flops(counter: FlopCounterMode) -> int:
    """FLOPs of convolutions and linear layers: what the real network shows the counter (its attention runs inside
    the blitzdiff::attention op, which the counter does not see; the meta twin runs it as plain matmuls)."""
    counts = counter.get_flop_counts()["Global"]
    return sum(counts.get(op, 0) for op in (torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm))


@pytest.mark.parametrize("model", ["unet-digits", "dit-digits"])
def test_the_meta_twin_runs_the_real_networks_layers(model, monkeypatch):
    pipe = blitzdiff.load(model)
    x = torch.randn((2, *pipe.latent_shape(None, None)))
    cond = {"class_labels": torch.tensor([0, 1])} if pipe.kind.class_conditional else {}
    with torch.no_grad(), FlopCounterMode(display=False) as real:
        pipe.model(x, torch.tensor([10.0, 10.0]), **cond)
    twin, exit_ = [], FlopCounterMode.__exit__
    monkeypatch.setattr(FlopCounterMode, "__exit__", lambda self, *exc: twin.append(self) or exit_(self, *exc))
    total = network_flops(pipe, 2)
    assert dense_flops(twin[0]) == dense_flops(real) > 0
    assert total > dense_flops(real)  # plus the attention's matmuls


@pytest.mark.parametrize(("sampler", "evaluations"), [("dpmpp_2m", 5), ("heun", 9)])
@pytest.mark.parametrize(("guidance", "network_batch"), [(1.0, 3), (1.25, 6)])
def test_run_flops_counts_every_evaluation_at_the_network_batch(sampler, evaluations, guidance, network_batch):
    pipe = blitzdiff.load("dit-digits")
    assert run_flops(pipe, sampler, 3, 5, guidance) == evaluations * network_flops(pipe, network_batch)


def test_dense_rate_and_floor(monkeypatch):
    monkeypatch.setitem(roofline.GEMM_SIZE, "cpu", 128)
    monkeypatch.setitem(roofline.CONV_SHAPE, "cpu", (2, 16, 8))
    rate = dense_rate(torch.device("cpu"), torch.float32)
    assert rate["gemm"]["size"] == 128 and rate["conv"]["shape"] == [2, 16, 8, 8] and rate["dtype"] == "float32"
    for kernel in ("gemm", "conv"):
        assert 0 < rate[kernel]["flops_per_s"] <= rate[kernel]["best_flops_per_s"] <= rate["best_flops_per_s"]
    assert rate["best_flops_per_s"] in (rate["gemm"]["best_flops_per_s"], rate["conv"]["best_flops_per_s"])
    # the fastest call's rate bounds the time: 2 GFLOP at 4 GFLOP/s is 500 ms
    assert floor_ms(2 * 10**9, {"best_flops_per_s": 4e9, "flops_per_s": 1e9}) == pytest.approx(500.0)


def test_a_system_faster_than_the_floor_is_warned_about():
    rows = [{"system": "blitzdiff-eager", "batch": 8, "steps": 10, "network_flops_per_s": 2.1e11},
            {"system": "diffusers", "batch": 8, "steps": 10, "network_flops_per_s": 1.9e11}]
    found = roofline_warnings(rows, {"best_flops_per_s": 2e11})
    assert len(found) == 1 and "blitzdiff-eager batch 8, 10 steps" in found[0] and "210.0 GFLOP/s" in found[0]
    assert roofline_warnings(rows, {"error": "x"}) == []


def test_report_gives_floor_and_speedup_bound_per_point():
    def rate(gemm: float, conv: float) -> dict:
        return {"gemm": {"size": 2048, "best_flops_per_s": gemm}, "conv": {"shape": [8, 128, 32, 32],
                                                                          "best_flops_per_s": conv}}

    def row(system: str, ms: float) -> dict:
        return {"system": system, "kind": "throughput", "batch": 8, "steps": 10, "median_ms": ms, "min_ms": ms,
                "max_ms": ms, "rel_iqr": 0.0, "unstable": False, "peak_total_bytes": 0, "peak_memory_bytes": 0}

    results = {
        "meta": {"model": "m", "sampler": "ddim", "dtype": "float32", "guidance_scale": 1.0,
                 "device": {"type": "cpu", "name": "cpu"}, "versions": {"torch": "t", "diffusers": "d"},
                 "repeats": 5,
                 "threads": {"count": 2, "requested": True, "usable_cores": 2, "load_before": 0.0,
                             "load_after": 0.0},
                 "throughput_steps": 10, "latency_batch": 8, "memory": {"method": "m"}},
        "systems": [],
        "rows": [row("blitzdiff-eager", 120.0), row("diffusers", 150.0), row("diffusers-compile", 140.0)],
        "step_split": None, "warnings": [],
        "roofline": {"rates": [rate(1.5e11, 2e11), {"error": "RuntimeError: x"}], "best_flops_per_s": 2e11,
                     "runs": [{"batch": 8, "steps": 10, "flops": 2 * 10**10, "floor_ms": 100.0}]},
    }
    text = format_results(results)
    best = text.split("fastest against fastest, throughput")[1].splitlines()[3].split()
    # batch, fastest blitzdiff (name, ms), fastest baseline (name, ms), speed-up, beyond the control's drift (no
    # control here), floor, bound = baseline / floor
    assert best[0] == "8" and best[4:] == ["diffusers-compile", "140.00", "ms", "1.17x", "-", "100.00", "ms",
                                           "1.40x"]
    for deviation, beyond in ((0.2, "no"), (0.1, "yes")):  # the speed-up is 1.17x
        results["control"] = {"system": "blitzdiff-eager", "rows": [{"ratio": 1 - deviation}, {"ratio": 1.0}],
                              "max_deviation": deviation}
        best = format_results(results).split("fastest against fastest, throughput")[1].splitlines()[3].split()
        assert best[7:9] == ["1.17x", beyond]
    assert "dense rate 200.0 GFLOP/s" in text
    assert "before: 2048^3 GEMM 150.0, conv 8x128x32x32 200.0; after: RuntimeError: x" in text


def test_the_floor_takes_the_faster_of_the_rates_before_and_after(monkeypatch):
    pipe = blitzdiff.load("dit-digits")
    job = bench_suite.Job(pipe, "dpmpp_2m", 1.25, bench_suite.BenchConfig(), print, total=1)
    monkeypatch.setattr(bench_suite, "dense_rate", lambda device, dtype: {"best_flops_per_s": 1e9})  # after: slow
    rows = [{"system": "diffusers", "batch": 2, "steps": 3, "median_ms": 1000.0}]
    found = job.roofline(rows, {"best_flops_per_s": 4e9})  # before: fast
    flops = run_flops(pipe, "dpmpp_2m", 2, 3, 1.25)
    assert found["best_flops_per_s"] == 4e9 and found["runs"][0]["floor_ms"] == pytest.approx(flops / 4e9 * 1e3)
    assert rows[0]["network_flops_per_s"] == pytest.approx(flops)  # per second of a 1 s run
    failed = job.roofline(rows, {"error": "RuntimeError: before"})
    assert failed["best_flops_per_s"] == 1e9
