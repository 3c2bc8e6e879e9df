"""blitzdiff.profiling and `blitzdiff profile` on the embedded models: profiler ranges for every plan stage and
part, ops attributed to the range they ran in (checked against time containment), the per-step split, the tables,
the Chrome trace, the command line end to end (its thread count and load warnings) and its one-line errors."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import blitzdiff
from blitzdiff import Pipeline, profiling
from blitzdiff.cli import main
from blitzdiff.engine.config import resolve
from blitzdiff.engine.solvers import build_plan
from blitzdiff.models.unet_2d_condition import UNet2DConditionModel

STEPS = 3


# PyTorch's convolution, or at batch 2 oneDNN's with the weight prepacked (blitzdiff.models.conv)
# PyTorch's call, prepacked oneDNN and the native kernels' ranges (models.conv)
CONVOLUTIONS = {"aten::convolution", "mkldnn::_convolution_pointwise", "blitzdiff::conv2d_direct",
                "blitzdiff::conv2d_winograd", "blitzdiff::conv2d_winograd4"}
LINEARS = {"aten::linear", "blitzdiff::linear_direct"}  # PyTorch's, or blitzdiff's kernel (models.linear)


def stage_count(pipe, sampler: str, steps: int) -> int:
    return len(build_plan(resolve(sampler, pipe.scheduler_config), steps).stages)


@pytest.fixture(scope="module")
def unet():
    return blitzdiff.load("unet-digits")


@pytest.fixture(scope="module")
def unet_run(unet, tmp_path_factory):
    trace = tmp_path_factory.mktemp("profile") / "trace.json"
    return profiling.profile_sampling(unet, 2, steps=STEPS, sampler="ddim", trace_path=trace)


def test_every_stage_has_both_ranges_in_the_trace(unet_run):
    with open(unet_run.trace_path) as f:
        trace = json.load(f)
    names = {event.get("name") for event in trace["traceEvents"]}
    for k in range(STEPS):
        assert {f"blitzdiff/step {k}/network", f"blitzdiff/step {k}/solver"} <= names
    assert f"blitzdiff/step {STEPS}/network" not in names


def test_unet_steps_split_into_network_solver_host(unet_run):
    assert not unet_run.on_device and unet_run.device == "cpu"
    assert [s.step for s in unet_run.steps] == list(range(STEPS))
    for s in unet_run.steps:
        assert s.network_ms > 0 and s.solver_ms > 0 and s.host_ms >= 0
        assert s.step_ms == pytest.approx(s.network_ms + s.solver_ms + s.host_ms, abs=1e-9)
        assert s.network_ms > s.solver_ms  # a UNet call against two scalar-times-tensor ops
        network_ops = {op.name for op in s.ops if op.part == "network"}
        solver_ops = {op.name for op in s.ops if op.part == "solver"}
        assert network_ops & CONVOLUTIONS and "blitzdiff::group_norm" in network_ops  # the CPU kernel
        assert not solver_ops & CONVOLUTIONS
        # the DDIM update a*x + b*denoised with the preconditioning: one fused kernel call (engine.fused_step)
        assert "blitzdiff::fused_step" in solver_ops and not {"aten::mul", "aten::add"} & solver_ops
    assert sum(s.step_ms for s in unet_run.steps) < unet_run.total_ms


def test_split_rows_summary_and_json(unet_run):
    rows = profiling.step_split(unet_run)
    assert [row["step"] for row in rows] == list(range(STEPS))
    assert set(rows[0]) == {"step", "network_ms", "solver_ms", "host_ms", "step_ms"}
    summary = profiling.split_summary(unet_run)
    assert summary["steps"] == STEPS
    assert summary["network_ms"] == statistics.median(row["network_ms"] for row in rows)
    data = json.loads(json.dumps(unet_run.to_dict()))
    assert len(data["per_step"]) == STEPS and data["summary"]["steps"] == STEPS
    merged = {(op["part"], op["name"]): op["calls"] for op in data["ops"]}
    one_step = {(op.part, op.name): op.calls for op in unet_run.ops(0)}
    conv = next(name for name in sorted(CONVOLUTIONS) if ("network", name) in merged)
    assert merged[("network", conv)] == STEPS * one_step[("network", conv)]


def test_tables(unet_run):
    steps_table = profiling.format_steps(unet_run).splitlines()
    assert steps_table[1].split() == ["step", "network", "ms", "solver", "ms", "host", "ms", "step", "ms"]
    assert len(steps_table) == 3 + STEPS + 1 and steps_table[-1].startswith("median")
    ops_table = profiling.format_ops(unet_run, top=4).splitlines()
    assert len(ops_table) == 3 + 4 + 1 and "device ms" not in ops_table[1]  # CPU: no device column
    shares = [float(line.split()[-1]) for line in ops_table[3:7]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100
    report = profiling.format_report(unet_run, top=3, per_step=True)
    assert report.count("top 3 of") == 1 + STEPS and "step 2 (" in report
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        profiling.format_ops(unet_run, top=0)


def test_ops_are_attributed_by_time_containment(unet):
    # An independent attribution: an op belongs to the range on its thread whose time interval contains it.
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        unet.sample(1, steps=2, sampler="ddim", output_type="raw", progress=False, scope=profiling.stage_ranges())
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    ranges = [e for e in events if e.name.startswith("blitzdiff/step ")]
    expected: dict[tuple[int, str], int] = {}
    for event in events:
        if event in ranges:
            continue
        inside = [r for r in ranges if r.thread == event.thread and r.time_range.start <= event.time_range.start
                  and event.time_range.end <= r.time_range.end]
        assert len(inside) <= 1
        if inside:
            _, step, part = inside[0].name.split("/")
            key = (int(step.removeprefix("step ")), part)
            expected[key] = expected.get(key, 0) + 1
    steps = profiling.split_steps(prof.events(), on_device=False)
    found = {(s.step, part): sum(op.calls for op in s.ops if op.part == part)
             for s in steps for part in profiling.PARTS}
    assert {key: count for key, count in found.items() if count} == expected
    assert found[(0, "network")] > 50


def test_kineto_links_find_every_event(unet):
    # torch < 2.12 keeps an event's launching op only in the Kineto results: the lookup by (id, device, start) must
    # find every FunctionEvent there, with the link torch >= 2.12 stores on the event itself.
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        unet.sample(1, steps=2, sampler="ddim", output_type="raw", progress=False, scope=profiling.stage_ranges())
    links, events = profiling.kineto_links(prof), prof.events()
    assert len(events) > 100 and all(profiling.event_key(e) in links for e in events)
    assert all(links[profiling.event_key(e)] == e.linked_correlation_id for e in events)


def test_heun_profiles_every_stage_of_a_dit():
    pipe = blitzdiff.load("dit-digits")
    result = profiling.profile_sampling(pipe, 2, steps=STEPS, sampler="heun", warmup=0, class_labels=[3, 7])
    stages = stage_count(pipe, "heun", STEPS)
    assert stages == 2 * STEPS - 1
    assert [s.step for s in result.steps] == list(range(stages))
    assert all(LINEARS & {op.name for op in s.ops if op.part == "network"} for s in result.steps)
    assert result.trace_path is None


def test_text_conditional_network_gets_prompt_embeddings():
    model = UNet2DConditionModel(dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4))
    pipe = Pipeline(model, {"_class_name": "DDIMScheduler"})
    embeddings = profiling.prompt_embeddings(pipe, 2, 3.0)
    assert {k: tuple(v.shape) for k, v in embeddings.items()} == {
        "encoder_hidden_states": (2, profiling.PROMPT_TOKENS, 12),
        "negative_encoder_hidden_states": (2, profiling.PROMPT_TOKENS, 12)}
    assert torch.equal(profiling.prompt_embeddings(pipe, 2)["encoder_hidden_states"],
                       embeddings["encoder_hidden_states"])  # fixed seed
    assert set(profiling.prompt_embeddings(pipe, 2, 1.0)) == {"encoder_hidden_states"}
    result = profiling.profile_sampling(pipe, 2, steps=2, warmup=0, guidance_scale=3.0, **embeddings)
    assert len(result.steps) == 2
    assert profiling.prompt_embeddings(blitzdiff.load("unet-digits"), 2, 3.0) == {}


def test_bad_calls_are_errors(unet):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(3).add(1)
    with pytest.raises(ValueError, match="no 'blitzdiff/step k/part' ranges"):
        profiling.split_steps(prof.events(), on_device=False)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        profiling.profile_sampling(unet, 1, steps=2, warmup=-1)


def test_cli_profile_writes_trace_and_json(tmp_path, capsys):
    trace, report = tmp_path / "t.json", tmp_path / "p.json"
    args = ["profile", "--model", "unet-digits", "--sampler", "ddim", "--steps", "2", "-n", "1", "--top", "5",
            "--per-step", "--trace", str(trace), "--json", str(report), "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "network ms" in printed and f"trace -> {trace}" in printed and printed.count("top 5 of") == 3
    assert "torch threads: 1 (as requested)" in printed
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "blitzdiff/step 1/network" in names
    data = json.loads(report.read_text())
    assert data["model"] == "unet-digits" and data["sampler"] == "ddim" and data["steps"] == 2
    assert [row["step"] for row in data["per_step"]] == [0, 1] and data["summary"]["network_ms"] > 0
    assert data["threads"]["count"] == data["threads"]["requested"] == 1 and data["threads"]["rule"] == "requested"
    assert data["threads"]["usable_cores"] >= 1 and isinstance(data["warnings"], list)


@pytest.mark.parametrize(("load", "threads", "warned"), [(0.0, 2, False), (3.9, 1, True)])
def test_cli_profile_takes_the_cores_the_load_leaves_and_warns(load, threads, warned, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["profile", "--model", "unet-digits", "--sampler", "ddim", "--steps", "1", "--top", "2",
                     "--trace", str(tmp_path / "t.json"), "--json", str(tmp_path / "p.json")]) == 0
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["threads"]["count"] == threads and data["threads"]["load_before"] == load
    assert f"torch threads: {threads} (by the rule" in printed
    assert ("WARNING: these figures may be wrong (1 problem)" in printed) is warned
    assert [w.split(":")[0] for w in data["warnings"]] == (["load"] if warned else [])


@pytest.mark.parametrize(("args", "message"), [
    (["--sampler", "plms"], "unknown sampler 'plms'"),
    (["--steps", "0"], "steps must be an int >= 1"),
    (["--top", "0"], "--top must be >= 1"),
    (["--dtype", "int8"], "dtype must be a floating-point torch.dtype"),
    (["--model", "unet-digits", "--guidance", "3"], "needs a conditional model"),
    (["--threads", "0"], "threads must be an int >= 1"),
])
def test_cli_profile_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(["profile", "--steps", "2", *args, "--trace", str(tmp_path / "t.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("blitzdiff profile: error:")
    assert not (tmp_path / "t.json").exists()


def test_cli_profile_error_is_the_only_stderr_line(tmp_path):
    # A separate process: what the user sees, C++ output included (the profiler logs its start and stop there, so
    # arguments must fail before it starts).
    result = subprocess.run([sys.executable, "-m", "blitzdiff", "profile", "--sampler", "plms", "--steps", "2",
                             "--trace", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "unknown sampler 'plms'" in result.stderr


@pytest.mark.cuda
def test_cuda_times_are_device_kernel_times(tmp_path):
    pipe = blitzdiff.load("unet-digits", device="cuda")
    result = profiling.profile_sampling(pipe, 2, steps=STEPS, sampler="ddim", trace_path=tmp_path / "t.json")
    assert result.on_device and [s.step for s in result.steps] == list(range(STEPS))
    for s in result.steps:
        # DDIM's last stage (to alpha_cumprod 1) returns the denoised sample itself: no solver kernel on the GPU
        # (seen on an H200: 0.0 ms), where the CPU's fused stage still copies it.
        assert s.network_ms > 0 and (s.solver_ms > 0 or s.step == STEPS - 1) and s.host_ms >= 0
        network_device = sum(op.device_ms for op in s.ops if op.part == "network")
        assert network_device == pytest.approx(s.network_ms)
        assert s.step_ms >= s.network_ms + s.solver_ms - 1e-6
    assert "device ms" in profiling.format_ops(result)
