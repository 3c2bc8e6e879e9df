"""bench.roofline: a run's network FLOPs (against a hand count of the DiT's matmuls), the GEMM rate, and the floor /
speed-up bound columns of bench's report."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import blitzdiff
from blitzdiff.bench import format_results
from blitzdiff.bench.roofline import floor_ms, gemm_rate, network_flops, run_flops


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


def test_gemm_rate_and_floor():
    gemm = gemm_rate(torch.device("cpu"), torch.float32, size=256)
    assert gemm["size"] == 256 and gemm["dtype"] == "float32"
    assert 0 < gemm["flops_per_s"] <= gemm["best_flops_per_s"]
    # the fastest call's rate bounds the time: 2 GFLOP at 4 GFLOP/s is 500 ms
    assert floor_ms(2 * 10**9, {"best_flops_per_s": 4e9, "flops_per_s": 1e9}) == pytest.approx(500.0)


def test_report_gives_floor_and_speedup_bound_per_point():
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
        "roofline": {"gemm": {"size": 2048, "dtype": "float32", "flops_per_s": 1e11, "best_flops_per_s": 2e11},
                     "runs": [{"batch": 8, "steps": 10, "flops": 2 * 10**10, "floor_ms": 100.0}]},
    }
    text = format_results(results)
    best = text.split("fastest against fastest, throughput")[1].splitlines()[3].split()
    # batch, fastest blitzdiff (name, ms), fastest baseline (name, ms), speed-up, floor, bound = baseline / floor
    assert best[0] == "8" and best[4:] == ["diffusers-compile", "140.00", "ms", "1.17x", "100.00", "ms", "1.40x"]
    assert "GEMM at 200.0 GFLOP/s (median 100.0)" in text
