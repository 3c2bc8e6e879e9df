"""The `blitzdiff` command on the embedded models: sample writes a PNG grid and reports speed, info describes a
checkpoint, eval scores samples; errors are one line on stderr and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from blitzdiff.cli import main


def test_sample_writes_a_grid_and_reports_speed(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--steps", "2", "-n", "4", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "images/s" in printed and "dit-digits" in printed
    grid = Image.open(out)
    assert grid.size == (2 * 64, 2 * 64)  # 2x2 tiles of 16x16 images, enlarged 4x
    assert len(set(grid.tobytes())) > 2  # not a blank image


def test_sample_unet_with_sampler_and_seed(tmp_path, capsys):
    out = tmp_path / "unet.png"
    args = ["sample", "--model", "unet-digits", "--sampler", "ddim", "--steps", "3", "-n", "2", "--seed", "5",
            "--output", str(out), "--no-progress"]
    assert main(args) == 0
    first = Image.open(out).tobytes()
    assert main(args) == 0
    assert Image.open(out).tobytes() == first  # same seed, same samples
    assert "ddim" in capsys.readouterr().out


def test_sample_through_a_runtime_mode_gives_the_same_grid(tmp_path, capsys):
    plain, bucketed = tmp_path / "plain.png", tmp_path / "eager.png"
    args = ["sample", "--model", "unet-digits", "--steps", "2", "-n", "3", "--no-progress"]
    assert main([*args, "--output", str(plain)]) == 0
    assert main([*args, "--output", str(bucketed), "--mode", "eager"]) == 0  # padded to bucket 4
    assert Image.open(plain).tobytes() == Image.open(bucketed).tobytes()
    assert "mode eager, second call; the first, with the build, took" in capsys.readouterr().out
    assert main([*args, "--mode", "graph"]) == 2  # CUDA graphs on the CPU: one-line error
    assert "needs the pipeline on a CUDA device" in capsys.readouterr().err


def test_info_describes_an_embedded_model(capsys):
    assert main(["info", "dit-digits"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class"] == "DiTTransformer2DModel" and info["parameters"] > 0
    assert info["scheduler"] is not None


def test_eval_scores_samples(tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", "dit-digits", "--steps", "4", "-n", "40", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert rows[0]["steps"] == 4 and rows[0]["fd"] >= 0 and 0 <= rows[0]["accuracy"] <= 1


@pytest.mark.parametrize(("args", "message"), [
    (["sample", "--model", "/nonexistent/model", "--no-progress"], "/nonexistent/model"),
    (["sample", "--sampler", "plms", "--steps", "2", "-n", "1", "--no-progress"], "unknown sampler 'plms'"),
    (["sample", "--steps", "0", "-n", "1", "--no-progress"], "steps must be an int >= 1"),
    (["sample", "--model", "unet-digits", "--guidance", "3", "--steps", "2", "-n", "1", "--no-progress"],
     "needs a conditional model"),
])
def test_errors_are_one_line(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "blitzdiff", *args, "--output", str(tmp_path / "x.png")]
                            if args[0] == "sample" else [sys.executable, "-m", "blitzdiff", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
