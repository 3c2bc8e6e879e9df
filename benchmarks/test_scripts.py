"""Every benchmark script (benchmarks/bench_*.py, benchmarks/kernels/bench_*.py) runs end to end in its --quick mode
(tiny sizes, 3 repeats, no torch.compile rows), as a user runs it, so none can rot unnoticed: it exits 0, says which
thread count it used, and prints a table of finite figures. A new script is picked up by its name.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted([*HERE.glob("bench_*.py"), *(HERE / "kernels").glob("bench_*.py")])
HEADER_WORDS = ("variant", "sampler", "layer")  # every script's table header names one of these columns


def run_script(script: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", *args], capture_output=True,
                            text=True, timeout=300, cwd=HERE.parent)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def table_rows(printed: str) -> list[list[str]]:
    """The words of each line of the script's table: after its header, before any warning banner."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if any(word in line.split() for word in HEADER_WORDS))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("!"):
            break
        rows.append(line.split())
    return rows


def numbers(words: list[str]) -> list[float]:
    found = []
    for word in words:
        try:
            found.append(float(word.removesuffix("x")))
        except ValueError:  # a shape, a name, "n/a"
            continue
    return found


def test_every_script_is_found():
    names = {script.name for script in SCRIPTS}
    assert {"bench_scheduler_overhead.py", "bench_attention.py", "bench_group_norm.py"} <= names and len(names) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: str(script.relative_to(HERE)))
def test_script_runs_quick(script, tmp_path):
    report = tmp_path / "figures.json"  # bench_scheduler_overhead.py also writes its figures as JSON
    printed = run_script(script, *(["--json", str(report)] if script.name == "bench_scheduler_overhead.py" else []))
    assert printed.startswith("torch threads: 1 (as requested)"), printed
    rows = table_rows(printed)
    assert len(rows) >= 2, printed  # a reference row and at least one contender
    for row in rows:
        figures = numbers(row)
        assert figures and all(math.isfinite(x) and x >= 0 for x in figures), (row, printed)
    if report.exists():
        check_overhead_json(json.loads(report.read_text()), rows)


def check_overhead_json(data: dict, rows: list[list[str]]) -> None:
    """The JSON of bench_scheduler_overhead.py --quick: its settings, the table's rows, ratio = the median of the
    rounds' theirs / ours."""
    assert data["meta"]["threads"]["count"] == 1 and data["meta"]["steps"] == 4 and data["meta"]["repeats"] == 3
    assert [row["sampler"] for row in data["rows"]] == [row[0] for row in rows] and len(rows) == 6
    for row in data["rows"]:
        assert row["blitzdiff_us_per_step"] > 0 and row["diffusers_us_per_step"] > 0
        per_round = sorted(b / a for a, b in zip(row["blitzdiff_us_rounds"], row["diffusers_us_rounds"], strict=True))
        assert len(per_round) == 3 and row["ratio"] == pytest.approx(per_round[1])  # the median round's ratio
        assert row["ratio_q25"] <= row["ratio"] <= row["ratio_q75"]
        assert row["blitzdiff_us_per_step"] == pytest.approx(sorted(row["blitzdiff_us_rounds"])[1])


def test_network_vs_diffusers_runs_and_agrees(tmp_path):
    report = tmp_path / "network.json"
    result = subprocess.run([sys.executable, str(HERE / "network_vs_diffusers.py"), "--model", "dit-digits",
                             "--batch", "2", "--rounds", "2", "--top", "3", "--json", str(report)],
                            capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    data = json.loads(report.read_text())
    assert list(data["systems"]) == ["diffusers", "blitzdiff-ref", "blitzdiff-auto"]
    for name, system in data["systems"].items():
        assert system["error"] < 1e-5, (name, system["error"])  # float32: the same network, the same inputs
        assert len(system["times_ms"]) == 2 and len(system["top"]) == 3 and system["profiled_ms"] > 0
        assert f"{name}: top 3" in result.stdout


def test_cpu_kernel_threads_runs(tmp_path):
    report = tmp_path / "threads.json"
    result = subprocess.run([sys.executable, str(HERE / "cpu_kernel_threads.py"), "--rounds", "1", "--json",
                             str(report)], capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rows = json.loads(report.read_text())["us_per_call"]
    assert len(rows) == 14 and all(set(row) == {"ref@1", "cpu@1", "ref@2", "cpu@2"} for row in rows.values())
    assert all(math.isfinite(us) and us > 0 for row in rows.values() for us in row.values())


def test_a_script_runs_with_another_checkouts_blitzdiff(tmp_path):
    """benchmarks/in_checkout.py runs a benchmark with the blitzdiff of the checkout it names (here a copy of the
    package in a temporary folder, without a built module: the installed blitzdiff._C serves it), and says which."""
    checkout = tmp_path / "checkout"
    shutil.copytree(HERE.parent / "blitzdiff", checkout / "blitzdiff",
                    ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    shutil.copytree(HERE, checkout / "benchmarks", ignore=shutil.ignore_patterns("__pycache__", "results"))
    script = ["benchmarks/bench_scheduler_overhead.py", "--quick", "--threads", "1", "--samplers", "ddim"]
    result = subprocess.run([sys.executable, str(HERE / "in_checkout.py"), str(checkout), *script],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    prefix = f"blitzdiff from {checkout.resolve()}, blitzdiff._C from "
    assert first.startswith(prefix) and not first.removeprefix(prefix).startswith(str(checkout.resolve())), first
    assert table_rows("\n".join(rest))[0][0] == "ddim"


def test_cpu_graph_steps_times_each_step_of_a_replay():
    result = subprocess.run([sys.executable, str(HERE / "cpu_graph_steps.py"), "--batch", "1", "--threads", "1",
                             "--repeats", "2"], capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dit-digits batch 1 (") and lines[0].endswith(" ms"), lines[0]
    kinds = {line.split()[0]: int(line.split()[1]) for line in lines[1:]}
    # the 27 linears and the patch embedding on blitzdiff's kernel (models.linear, models.conv)
    assert kinds["Conv2dNhwc.run"] == 28 and kinds["attention_cpu"] == 6 and kinds["gelu_tanh_cpu"] == 6, kinds
    assert sum(kinds.values()) == int(lines[0].split("(")[1].split()[0])  # every step counted once
