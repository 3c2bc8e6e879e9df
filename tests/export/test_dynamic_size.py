"""Dynamic height and width of exported UNets (size=((h_min, h_max), (w_min, w_max)) in latent pixels, multiples of
2 ** the down-sampling stages): one graph runs at every size of its range like the torch forward at that size;
sizes outside the range or off the multiple, and networks whose size is fixed (DiT), are refused."""

from __future__ import annotations

import onnx
import pytest
import torch

import blitzdiff
from blitzdiff.cli import main
from blitzdiff.export import OnnxGraph, export_onnx, read_manifest
from blitzdiff.export.manifest import weights_digest
from blitzdiff.models.presets import build_random

from .test_onnx import SCHEDULER, UNET, network_inputs, pipeline, relative

# Three levels, two down-sampling stages: sizes are multiples of 4.
UNET3 = {**UNET, "block_out_channels": (8, 16, 16), "down_block_types": ("DownBlock2D", "AttnDownBlock2D",
         "DownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
SIZES = {"unet": ((8, 24), (8, 32)), "sd": ((4, 16), (6, 12))}
RUN_AT = {"unet": [(8, 32), (20, 12)], "sd": [(4, 12), (16, 6), (10, 8)]}  # (height, width)


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    unet = blitzdiff.Pipeline(build_random("UNet2DModel", UNET3, seed=5), SCHEDULER, name="tiny-unet3")
    sd = pipeline("sd")
    return {name: (pipe, export_onnx(pipe, root / name, size=SIZES[name], batch=(1, 4)))
            for name, pipe in (("unet", unet), ("sd", sd))}


@pytest.mark.parametrize("name", ["unet", "sd"])
def test_one_graph_runs_like_torch_at_every_size(sized, name):
    pipe, folder = sized[name]
    graph = OnnxGraph(folder)
    for height, width in RUN_AT[name]:
        inputs = network_inputs(pipe, 3, height, width)
        with torch.no_grad():
            expected = pipe.model(**inputs)
        out = graph(**inputs)
        assert out.shape == expected.shape == (3, pipe.model.config["out_channels"], height, width)
        assert relative(out, expected) < 1e-5


def test_manifest_and_graph_name_the_dynamic_dims(sized):
    pipe, folder = sized["unet"]
    manifest = read_manifest(folder)
    assert manifest["size"] == {"height": [8, 24], "width": [8, 32], "multiple": 4}
    assert manifest["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}
    assert manifest["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["model"]["weights_sha256"] == weights_digest(pipe.model)
    dims = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3])) and dims[1].dim_value == 3


def test_sizes_outside_the_range_or_off_the_multiple_are_refused(sized):
    pipe, folder = sized["unet"]
    graph = OnnxGraph(folder)
    cases = [((28, 8), r"height 28 is outside the exported range 8..24; export with a size range \(size=, "
                       r"--height / --width\) covering it"),
             ((8, 4), r"width 4 is outside the exported range 8..32"),
             ((10, 8), r"height 10 is not a multiple of 4 \(the network's down-sampling\); the export takes multiples "
                       r"of 4 in 8..24"),
             ((8, 30), r"width 30 is not a multiple of 4")]
    for (height, width), message in cases:
        with pytest.raises(ValueError, match=message):
            graph(**network_inputs(pipe, 2, height, width))


def test_bad_size_options(tmp_path):
    unet = blitzdiff.Pipeline(build_random("UNet2DModel", UNET3, seed=5), SCHEDULER, name="tiny-unet3")
    shape = r"size must be \(\(height_min, height_max\), \(width_min, width_max\)\) in latent pixels, each a multiple "
    for size in [((6, 16), (8, 16)), ((16, 8), (8, 16)), ((0, 8), (8, 8)), ((8, 16),), ((8, 16), (8, True)),
                 ((8.0, 16), (8, 16)), "8..16"]:
        with pytest.raises(ValueError, match=shape + r"of 4 \(the 2 down-sampling stages of this UNet2DModel\) with "
                                                   r"4 <= min <= max; got"):
            export_onnx(unet, tmp_path / "out", size=size)
    with pytest.raises(ValueError, match=r"DiTTransformer2DModel takes no dynamic size: its position table is fixed at "
                                         r"its sample size 8; export it with size=None"):
        export_onnx(pipeline("dit"), tmp_path / "out", size=((8, 16), (8, 16)))
    for what, options in (("loop", {"steps": 2}), ("vae", {})):
        with pytest.raises(ValueError, match=rf"size \(dynamic height / width\) applies to what='denoiser', not "
                                             rf"'{what}'"):
            export_onnx(pipeline("sd"), tmp_path / "out", what=what, size=((4, 8), (4, 8)), **options)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_float16_with_a_size_range(tmp_path, capsys):
    out = tmp_path / "unet"
    assert main(["export", "--model", "unet-digits", "--out", str(out), "--dtype", "float16", "--height", "16", "32",
                 "--width", "8", "24", "--batch", "1", "2"]) == 0
    assert f"unet-digits: denoiser -> {out}" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["size"] == {"height": [16, 32], "width": [8, 24], "multiple": 4}
    assert manifest["precision"]["dtype"] == "float16" and manifest["inputs"][0]["dtype"] == "float16"
    pipe = blitzdiff.load("unet-digits")
    x, t = torch.randn(2, 1, 32, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 20.0])
    with torch.no_grad():
        expected = pipe.model(x, t)
    assert relative(OnnxGraph(out)(sample=x.half(), timestep=t).float(), expected) < 1e-2
    assert main(["export", "--model", "unet-digits", "--out", str(tmp_path / "odd"), "--height", "10", "32"]) == 2
    assert capsys.readouterr().err.startswith("blitzdiff export: error: size must be ((height_min, height_max)")
