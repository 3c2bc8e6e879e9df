"""The `blitzdiff` command on the embedded models: sample writes a PNG grid and reports speed, info describes a
checkpoint, eval scores samples; errors are one line on stderr and exit status 2.

The CLI's outputs are compared with what the library gives for the same arguments, computed here independently:
the grid's pixels with numpy from `pipe.sample(output_type="numpy")`, eval's figures with `quality.evaluate`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import blitzdiff
from blitzdiff import quality
from blitzdiff.cli import main

ASSETS = quality.ASSETS


def recommended_guidance(model: str) -> float:
    return json.loads((ASSETS / model / "model_index.json").read_text())["_blitzdiff_guidance_scale"]


def expected_grid(images: np.ndarray) -> np.ndarray:
    """The spec of the grid, from float images [n, H, W, C] in [0, 1]: pixels x * 255 rounded; ceil(sqrt(n)) columns;
    tiles enlarged (nearest) to at least 64 px; 2 px of grey 128 between tiles and in empty cells."""
    n, height, width, channels = images.shape
    pixels = np.round(images * 255).astype(np.uint8)
    zoom = max(1, math.ceil(64 / max(height, width)))
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    tile_h, tile_w = height * zoom, width * zoom
    sheet = np.full((rows * tile_h + (rows - 1) * 2, columns * tile_w + (columns - 1) * 2, channels), 128, np.uint8)
    for i in range(n):
        top, left = (i // columns) * (tile_h + 2), (i % columns) * (tile_w + 2)
        sheet[top:top + tile_h, left:left + tile_w] = pixels[i].repeat(zoom, 0).repeat(zoom, 1)
    return sheet[..., 0] if channels == 1 else sheet


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """main(args) -> (exit status, stdout, stderr); argparse's own exits included."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_grid_is_the_pipelines_samples_with_the_recommended_guidance(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, printed, _ = run(["sample", "--steps", "2", "-n", "5", "--seed", "3", "--output", str(out),
                            "--no-progress"], capsys)
    assert code == 0
    guidance = recommended_guidance("dit-digits")
    assert guidance != 1.0 and "ms/step" in printed and "images/s" in printed
    assert f"dit-digits: 5 samples, 2 steps of ddpm on cpu (float32, guidance {guidance:g})" in printed
    pipe = blitzdiff.load("dit-digits")
    images = pipe.sample(5, steps=2, seeds=3, class_labels=[0, 1, 2, 3, 4], guidance_scale=guidance,
                         output_type="numpy", progress=False)
    grid = png(out)
    assert grid.shape == (2 * 64 + 2, 3 * 64 + 2 * 2)  # 3 columns, 2 rows of 16x16 tiles enlarged 4x, 2 px gaps
    np.testing.assert_array_equal(grid, expected_grid(images))


def test_sample_class_guidance_sampler_and_device(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, printed, _ = run(["sample", "--class", "3", "7", "--guidance", "2.5", "--sampler", "ddim", "--device",
                            "cpu", "--steps", "3", "-n", "3", "--output", str(out), "--no-progress"], capsys)
    assert code == 0 and "3 steps of ddim on cpu (float32, guidance 2.5)" in printed
    images = blitzdiff.load("dit-digits", device="cpu").sample(
        3, steps=3, sampler="ddim", seeds=0, class_labels=[3, 7, 3], guidance_scale=2.5, output_type="numpy",
        progress=False)
    np.testing.assert_array_equal(png(out), expected_grid(images))


def test_sample_unconditional_with_dtype(tmp_path, capsys):
    half, full = tmp_path / "bf16.png", tmp_path / "fp32.png"
    args = ["sample", "--model", "unet-digits", "--sampler", "dpmpp_2m", "--steps", "3", "-n", "4", "--seed", "5",
            "--no-progress"]
    assert run([*args, "--dtype", "bfloat16", "--output", str(half)], capsys)[0] == 0
    assert run([*args, "--output", str(full)], capsys)[0] == 0
    for path, dtype in ((half, torch.bfloat16), (full, torch.float32)):
        images = blitzdiff.load("unet-digits", dtype=dtype).sample(4, steps=3, sampler="dpmpp_2m", seeds=5,
                                                                  output_type="numpy", progress=False)
        np.testing.assert_array_equal(png(path), expected_grid(images))
    assert not np.array_equal(png(half), png(full))  # --dtype reached the network


def test_sample_through_a_runtime_mode_gives_the_same_grid(tmp_path, capsys):
    plain, bucketed = tmp_path / "plain.png", tmp_path / "eager.png"
    args = ["sample", "--model", "unet-digits", "--steps", "2", "-n", "3", "--no-progress"]
    assert main([*args, "--output", str(plain)]) == 0
    assert main([*args, "--output", str(bucketed), "--mode", "eager"]) == 0  # padded to bucket 4
    assert Image.open(plain).tobytes() == Image.open(bucketed).tobytes()
    assert "mode eager, second call; the first, with the build, took" in capsys.readouterr().out
    assert main([*args, "--mode", "graph"]) == 2  # CUDA graphs on the CPU: one-line error
    assert "needs the pipeline on a CUDA device" in capsys.readouterr().err
    exported = tmp_path / "onnxruntime.png"
    assert main([*args, "--output", str(exported), "--mode", "onnxruntime"]) == 0  # the network on ONNX Runtime
    assert "s of export and load" in capsys.readouterr().out
    difference = np.abs(png(exported).astype(int) - png(plain).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # float32 to 1e-5: a rare rounding step at most


def test_sample_gives_a_text_conditional_unet_stand_in_prompts(tmp_path, capsys):
    """A UNet2DConditionModel (as the sd15-unet preset, here a small one) is sampled with random prompt embeddings
    [n, 77, dim] from seed 0 (negative ones from the same generator when guided), as bench and profile do."""
    folder, out = tmp_path / "text-unet", tmp_path / "grid.png"
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=2, cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(folder)
    code, printed, _ = run(["sample", "--model", str(folder), "--guidance", "3", "--steps", "2", "-n", "2",
                            "--output", str(out), "--no-progress"], capsys)
    assert code == 0 and "random stand-in prompt embeddings" in printed and "raw latents" in printed
    generator = torch.Generator().manual_seed(0)
    context, negative = torch.randn(2, 77, 8, generator=generator), torch.randn(2, 77, 8, generator=generator)
    images = blitzdiff.load(folder).sample(2, steps=2, seeds=0, encoder_hidden_states=context,
                                           negative_encoder_hidden_states=negative, guidance_scale=3.0,
                                           output_type="numpy", progress=False)
    np.testing.assert_array_equal(png(out), expected_grid(images))  # 4 latent channels: RGBA


def test_info_describes_an_embedded_model_and_defaults_to_dit_digits(capsys):
    code, printed, _ = run(["info", "dit-digits"], capsys)
    info = json.loads(printed)
    assert code == 0 and info["class"] == "DiTTransformer2DModel" and info["scheduler"] == "DDPMScheduler"
    parameters = sum(p.numel() for p in blitzdiff.load("dit-digits").model.parameters())
    assert info["parameters"] == parameters
    assert run(["info"], capsys)[1] == printed


def test_info_of_a_preset_counts_its_parameters(capsys):
    from blitzdiff.models import build_preset

    code, printed, _ = run(["info", "dit-xl-2-256"], capsys)
    info = json.loads(printed)
    model, _ = build_preset("dit-xl-2-256", device="meta")
    assert code == 0 and info["class"] == "DiTTransformer2DModel"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["config"]["num_embeds_ada_norm"] == 1000 and info["scheduler"] == "DDIMScheduler"


def _expected_scores(model: str, n: int, steps: int, sampler: str, guidance: float) -> dict:
    pipe = blitzdiff.load(model)
    labels = [i % 10 for i in range(n)] if pipe.kind.class_conditional else None
    images = pipe.sample(n, steps=steps, sampler=sampler, seeds=0, class_labels=labels, guidance_scale=guidance,
                         output_type="tensor", progress=False)
    return quality.evaluate(images * 2 - 1, None if labels is None else torch.tensor(labels))


def test_eval_scores_the_pipelines_samples_with_the_recommended_guidance(tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, printed, err = run(["eval", "--sampler", "heun", "--steps", "2", "3", "-n", "20", "--json", str(report)],
                             capsys)
    assert code == 0
    guidance = recommended_guidance("dit-digits")
    rows = json.loads(report.read_text())
    assert [(r["model"], r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("dit-digits", "heun", 2, guidance), ("dit-digits", "heun", 3, guidance)]
    for row in rows:
        expected = _expected_scores("dit-digits", 20, row["steps"], "heun", guidance)
        assert row["fd"] == pytest.approx(expected["fd"], rel=1e-9)
        assert row["accuracy"] == expected["accuracy"] and row["class_counts"] == expected["class_counts"]
        nfe = {2: 3, 3: 5}[row["steps"]] * 2  # Heun's 2 * steps - 1 evaluations, each with the doubled guided batch
        assert row["nfe"] == nfe
        assert (f"dit-digits heun {row['steps']} steps (NFE {nfe}), guidance {guidance:g}: fd {row['fd']:.3f}"
                in printed)
    # the progress bar counts network evaluations (Heun's 2 and 3 steps are 3 + 5) and stays visible at the end
    assert "eval: 100%" in err.split("\r")[-1] and "8/8" in err.split("\r")[-1]


def test_eval_with_guidance_and_an_unconditional_model(tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, printed, _ = run(["eval", "--guidance", "2", "--sampler", "ddim", "--steps", "2", "-n", "20",
                            "--no-progress"], capsys)
    assert code == 0 and "guidance 2: fd" in printed
    assert f"fd {_expected_scores('dit-digits', 20, 2, 'ddim', 2.0)['fd']:.3f}" in printed
    code, _, err = run(["eval", "--model", "unet-digits", "--sampler", "ddim", "--steps", "3", "-n", "20",
                        "--no-progress", "--json", str(report)], capsys)
    (row,) = json.loads(report.read_text())
    assert code == 0 and err == "" and row["guidance"] == 1.0 and "accuracy" not in row
    assert row["fd"] == pytest.approx(_expected_scores("unet-digits", 20, 3, "ddim", 1.0)["fd"], rel=1e-9)


def test_eval_of_several_models_writes_a_table_a_plot_and_a_sheet(tmp_path, capsys):
    plot, sheet, report = tmp_path / "fd.png", tmp_path / "sheet.png", tmp_path / "eval.json"
    code, printed, _ = run(["eval", "--model", "dit-digits", "unet-digits", "--sampler", "ddim", "--steps", "1", "2",
                            "-n", "20", "--no-progress", "--plot", str(plot), "--sheet", str(sheet), "--json",
                            str(report)], capsys)
    assert code == 0
    rows = json.loads(report.read_text())
    guidance = recommended_guidance("dit-digits")
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [
        ("dit-digits", 1, 2), ("dit-digits", 2, 4), ("unet-digits", 1, 1), ("unet-digits", 2, 2)]  # DiT guided: x2
    assert rows[3]["fd"] == pytest.approx(_expected_scores("unet-digits", 20, 2, "ddim", 1.0)["fd"], rel=1e-9)
    assert rows[1]["fd"] == pytest.approx(_expected_scores("dit-digits", 20, 2, "ddim", guidance)["fd"], rel=1e-9)
    table = printed[printed.index("model "):].splitlines()
    assert len(table) == 2 + 4 and table[2].split()[:4] == ["dit-digits", "ddim", "1", "2"]
    for png in (plot, sheet):
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(sheet) as image:
        assert image.size[1] == 4 * (48 + 2) + 2  # a row per model and step count
        assert np.asarray(image)[2:50, -48:].std() > 10  # the last tile of the first row holds a sample, not blank
    code, _, err = run(["eval", "--plot", str(tmp_path / "fd.jpg")], capsys)
    assert code == 2 and "--plot" in err and "ending in .png" in err


def test_eval_gives_a_model_its_own_sampler_and_steps(tmp_path, capsys):
    report = tmp_path / "eval.json"
    code, _, _ = run(["eval", "--model", "dit-digits:ddim@1,3", "unet-digits@2", "--sampler", "heun", "--steps", "4",
                      "-n", "20", "--no-progress", "--json", str(report)], capsys)
    rows = json.loads(report.read_text())
    assert code == 0 and [(r["model"], r["sampler"], r["steps"]) for r in rows] == [
        ("dit-digits", "ddim", 1), ("dit-digits", "ddim", 3), ("unet-digits", "heun", 2)]
    assert rows[2]["fd"] == pytest.approx(_expected_scores("unet-digits", 20, 2, "heun", 1.0)["fd"], rel=1e-9)


def test_help_lists_samplers_models_and_options(capsys):
    code, printed, _ = run(["sample", "--help"], capsys)
    text = "".join(printed.split())  # argparse wraps lines, also at hyphens
    assert code == 0
    for name in [*blitzdiff.SAMPLERS, "dit-digits (default)", "unet-digits", "sd15-unet", "--dtype",
                 "sampling steps (default 20)"]:
        assert "".join(name.split()) in text, name


@pytest.mark.parametrize(("args", "message"), [
    (["sample", "--output", "/nonexistent/o.png"], "folder /nonexistent does not exist"),
    # checked before the model is loaded: the missing model is not what is reported
    (["sample", "--model", "/nonexistent/model", "--output", "o.txt"], "give a file name ending in .png"),
    (["sample", "--output", "."], "give a file name ending in .png"),
    (["eval", "--json", "/nonexistent/r.json"], "folder /nonexistent does not exist"),
    (["eval", "--model", "dit-digits@4,x"], "--model dit-digits@4,x: the steps after '@' must be integers >= 1"),
    (["eval", "--model", "dit-digits@0"], "the steps after '@' must be integers >= 1 separated by commas"),
    (["eval", "--model", "dit-digits:@2"], "name a sampler after ':' (e.g. dit-digits:ddim) or leave out the ':'"),
    (["sample", "--device", "foo", "--output", "o.png"], "foo"),
    *([(["sample", "--device", "cuda", "--output", "o.png"], "cuda")] if not torch.cuda.is_available() else []),
    (["sample", "--steps", "x"], "blitzdiff sample: error: argument --steps: invalid int value: 'x'"),
    ([], "blitzdiff: error: the following arguments are required: command"),
    (["sample", "--sampler", "plms", "--steps", "2", "-n", "1", "--output", "o.png"], "unknown sampler 'plms'"),
    (["sample", "--steps", "0", "-n", "1", "--output", "o.png"], "steps must be an int >= 1"),
    (["sample", "--model", "unet-digits", "--guidance", "3", "--steps", "2", "-n", "1", "--output", "o.png"],
     "needs a conditional model"),
    (["info", "/nonexistent/model"], "/nonexistent/model"),
])
def test_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, printed, err = run([*args, "--no-progress"] if args[:1] == ["sample"] else args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith(f"blitzdiff {args[0]}: error: " if args else "blitzdiff: error: ")
    assert printed == "" and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args", [["sample", "--model", "/nonexistent/model"], ["sample", "-n", "many"]])
def test_python_m_blitzdiff_errors_are_one_line(args):
    result = subprocess.run([sys.executable, "-m", "blitzdiff", *args], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("blitzdiff sample: error: "), \
        result.stderr


def test_export_writes_a_graph_that_runs_like_the_model(tmp_path, capsys):
    import blitzdiff
    from blitzdiff.export import OnnxGraph

    out = tmp_path / "unet"
    assert main(["export", "--model", "unet-digits", "--out", str(out), "--batch", "1", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"unet-digits: denoiser -> {out}" in printed and "batch 1..4" in printed
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 500.0, 1.0])
    with torch.no_grad():
        expected = blitzdiff.load("unet-digits").model(x, t)
    assert ((OnnxGraph(out)(sample=x, timestep=t) - expected).abs().max() / expected.abs().max()) < 1e-5
    assert main(["export", "--model", "unet-digits", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"blitzdiff export: error: {out} exists; choose a new folder or pass overwrite=True (--overwrite)"]


@pytest.mark.parametrize(("args", "message"), [
    (["--what", "loop", "--steps", "2"],
     "--engine tensorrt builds engines of denoiser and vae exports, not --what loop"),
    (["--precision", "int8"], "unknown --precision 'int8'; allowed: fp32, tf32, fp16, bf16"),
    ([], 'TensorRT engines need the tensorrt package, which is not installed: pip install "blitzdiff[tensorrt]"'),
])
def test_export_engine_errors_come_before_the_export(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this project's machines: not installable
    out = tmp_path / "unet"
    assert main(["export", "--model", "unet-digits", "--out", str(out), "--engine", "tensorrt", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"blitzdiff export: error: {message}")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # refused before anything was exported


def test_distill_progressive_writes_a_student_and_scores_it(tmp_path, capsys):
    out = tmp_path / "pd"
    code, printed, _ = run(["distill", "progressive", "--out", str(out), "--steps-from", "4", "--steps-to", "2",
                            "--iters", "3", "--batch", "4", "--guidance", "1.25", "--eval", "20", "--no-progress"],
                           capsys)
    assert code == 0 and f"student (2 steps, ddim) -> {out} (trained in" in printed
    student = blitzdiff.load(out)
    assert student.scheduler_config["prediction_type"] == "v_prediction" and student.default_guidance_scale == 1.0
    table = printed[printed.index("model "):].splitlines()[2:]
    assert [line.split()[:4] for line in table] == [["pd", "ddim", "2", "2"], ["dit-digits", "ddim", "2", "4"],
                                                    ["dit-digits", "ddim", "4", "8"]]
    code, _, err = run(["distill", "progressive", "--out", str(tmp_path / "bad"), "--steps-from", "64",
                        "--steps-to", "3", "--iters", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "blitzdiff distill: error:" in err
    assert not (tmp_path / "bad").exists()


def test_distill_consistency_writes_an_lcm_student_and_scores_it(tmp_path, capsys):
    out = tmp_path / "cd"
    code, printed, _ = run(["distill", "consistency", "--out", str(out), "--iters", "2", "--batch", "4",
                            "--guidance", "1.25", "--eval", "20", "--no-progress"], capsys)
    assert code == 0 and f"student (lcm, 1-8 steps) -> {out} (trained in" in printed
    assert blitzdiff.load(out).sampler_name == "lcm"
    table = printed[printed.index("model "):].splitlines()[2:]
    assert [line.split()[:4] for line in table] == [["cd", "lcm", "1", "1"], ["cd", "lcm", "2", "2"],
                                                    ["cd", "lcm", "4", "4"], ["dit-digits", "ddim", "4", "8"],
                                                    ["dit-digits", "ddim", "50", "100"]]
