"""ONNX export run on ONNX Runtime's CPU provider, against the torch models and `pipe.sample` it came from.

Tiny random-weight models of every architecture (UNet2D, the SD UNet with external data forced, DiT with learned
sigma, the VAE decoder); each exported graph must pass onnx.checker, carry a manifest that describes it, take a
dynamic batch (batch 1 and batch 5 against the same rows of batch 5), and equal its torch source. The exported loop
must equal `pipe.sample(..., output_type="raw")` for deterministic and stochastic samplers.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

import blitzdiff
from blitzdiff.export import OnnxGraph, export_onnx, read_manifest
from blitzdiff.export.manifest import write_manifest
from blitzdiff.models.presets import build_random

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "clip_sample": False, "timestep_spacing": "trailing"}
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 2, "out_channels": 4, "num_layers": 2,
       "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 5}
UNET = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16), "layers_per_block": 1,
        "norm_num_groups": 4, "attention_head_dim": 4, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
SD = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (8, 16), "layers_per_block": 1,
      "norm_num_groups": 4, "attention_head_dim": 2, "cross_attention_dim": 8,
      "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
VAE = {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
       "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
       "out_channels": 3, "scaling_factor": 0.5}
LOOP_SAMPLERS = ("ddim", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde", "lcm")


def pipeline(name: str) -> blitzdiff.Pipeline:
    if name == "dit":
        return blitzdiff.Pipeline(build_random("DiTTransformer2DModel", DIT, seed=1), SCHEDULER, name="tiny-dit")
    if name == "unet":
        return blitzdiff.Pipeline(build_random("UNet2DModel", UNET, seed=2), SCHEDULER, name="tiny-unet")
    vae = build_random("AutoencoderKL", VAE, seed=4)
    return blitzdiff.Pipeline(build_random("UNet2DConditionModel", SD, seed=3), SCHEDULER, vae, name="tiny-sd")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def network_inputs(pipe: blitzdiff.Pipeline, batch: int, height: int | None = None,
                   width: int | None = None) -> dict[str, torch.Tensor]:
    """The network's inputs at `batch` (and a latent height / width other than the sample size)."""
    generator = torch.Generator().manual_seed(batch)
    channels, h, w = pipe.latent_shape(None, None)
    inputs = {"sample": torch.randn(batch, channels, height or h, width or w, generator=generator),
              "timestep": torch.linspace(999, 1, batch)}
    if pipe.kind.class_conditional:
        inputs["class_labels"] = torch.arange(batch) % (pipe.num_classes + 1)  # the null class included
    if pipe.kind.text_conditional:
        inputs["encoder_hidden_states"] = torch.randn(batch, 77, 8, generator=generator)
    return inputs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (pipeline, export folder) for each architecture's denoiser and the SD pipeline's VAE decoder."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name in ("dit", "unet", "sd"):
        pipe = pipeline(name)
        made[name] = pipe, export_onnx(pipe, root / name, batch=(1, 8), external_data=name == "sd")
    made["vae"] = made["sd"][0], export_onnx(made["sd"][0], root / "vae", what="vae", batch=(1, 8))
    return made


@pytest.mark.parametrize("name", ["dit", "unet", "sd"])
def test_denoiser_matches_torch_at_any_batch(exports, name):
    pipe, folder = exports[name]
    graph = OnnxGraph(folder)
    inputs = network_inputs(pipe, 5)
    with torch.no_grad():
        expected = pipe.model(**inputs)
    five = graph(**inputs)
    one = graph(**{k: v[2:3] for k, v in inputs.items()})
    assert five.shape == expected.shape and relative(five, expected) < 1e-5
    assert relative(one, expected[2:3]) < 1e-5


def test_vae_decoder_matches_torch(exports):
    pipe, folder = exports["vae"]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe.vae.decode(latents)
    out = OnnxGraph(folder)(latent_sample=latents)
    assert out.shape == (3, 3, 16, 16) and relative(out, expected) < 1e-5


def test_manifest_describes_the_graph(exports):
    pipe, folder = exports["dit"]
    manifest = read_manifest(folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [spec["name"] for spec in manifest["inputs"]]
    assert manifest["inputs"] == [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 2, 8, 8]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "class_labels", "dtype": "int64", "shape": ["batch"]}]
    assert manifest["outputs"] == [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    assert manifest["what"] == "denoiser" and manifest["batch"] == [1, 8] and manifest["opset"] == 18
    assert manifest["model"]["class"] == "DiTTransformer2DModel" and manifest["model"]["config"]["num_layers"] == 2
    assert manifest["scheduler_config"] == SCHEDULER and set(manifest["files"]) == {"model.onnx"}
    assert manifest["optimized"] is True
    symbolic = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert symbolic.dim_param and not symbolic.dim_value  # the batch dim is dynamic in the graph itself


def test_large_weights_go_to_external_data(exports):
    _, folder = exports["sd"]
    files = read_manifest(folder)["files"]
    assert len(files) == 2 and "model.onnx" in files  # the graph and its weights file
    weights = next(name for name in files if name != "model.onnx")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {entry.value for t in external for entry in t.external_data if entry.key == "location"}
    assert len(external) > 10 and locations == {weights}


@pytest.fixture(scope="module")
def dit_loops(tmp_path_factory):
    root = tmp_path_factory.mktemp("loops")
    pipe = pipeline("dit")
    return pipe, {sampler: export_onnx(pipe, root / sampler, what="loop", sampler=sampler, steps=3, batch=(1, 6),
                                       guidance_scale=2.0) for sampler in LOOP_SAMPLERS}


@pytest.mark.parametrize("sampler", LOOP_SAMPLERS)
def test_exported_loop_equals_pipe_sample(dit_loops, sampler):
    pipe, folders = dit_loops
    graph = OnnxGraph(folders[sampler])
    seeds, labels = [11, 3, 7, 40, 2], [0, 1, 2, 3, 4]
    for scale in (2.0, 3.5):  # the scale is an input: a new one needs no new export
        expected = pipe.sample(5, steps=3, sampler=sampler, seeds=seeds, class_labels=labels, guidance_scale=scale,
                               output_type="raw", progress=False)
        seed_tensor = torch.tensor(seeds)
        out = graph(noise=pipe.initial_noise(seed_tensor, (2, 8, 8)), seeds=seed_tensor,
                    class_labels=torch.tensor(labels), guidance_scale=torch.tensor(scale))
        assert relative(out, expected) < 1e-4
    single = graph(noise=pipe.initial_noise(torch.tensor([7]), (2, 8, 8)), seeds=torch.tensor([7]),
                   class_labels=torch.tensor([2]), guidance_scale=torch.tensor(3.5))
    assert relative(single, expected[2:3]) < 1e-4
    loop = read_manifest(folders[sampler])["loop"]
    assert loop["sampler"] == sampler and loop["steps"] == 3 and loop["guided"]
    assert loop["evaluations"] == len(loop["plan"]["stages"])


def test_text_conditional_loop_with_negative_prompts(tmp_path):
    pipe = pipeline("sd")  # also the unoptimized graph: the same numbers, more nodes
    folder = export_onnx(pipe, tmp_path / "loop", what="loop", sampler="dpmpp_2m", steps=3, guidance_scale=5.0,
                         optimize=False)
    assert read_manifest(folder)["optimized"] is False
    generator = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 77, 8, generator=generator), torch.randn(2, 77, 8, generator=generator)
    expected = pipe.sample(2, steps=3, sampler="dpmpp_2m", seeds=[4, 5], encoder_hidden_states=prompt,
                           negative_encoder_hidden_states=negative, guidance_scale=5.0, output_type="raw",
                           progress=False)
    seeds = torch.tensor([4, 5])
    out = OnnxGraph(folder)(noise=pipe.initial_noise(seeds, (4, 8, 8)), seeds=seeds, encoder_hidden_states=prompt,
                            negative_encoder_hidden_states=negative, guidance_scale=torch.tensor(5.0))
    assert relative(out, expected) < 1e-4


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_export_options(tmp_path):
    pipe = pipeline("dit")
    cases = [({"what": "everything"}, r"unknown export 'everything'; allowed: denoiser, loop, vae"),
             ({"what": "vae"}, r"tiny-dit has no VAE decoder to export"),
             ({"what": "loop"}, r"what='loop' exports a fixed number of steps: pass steps"),
             ({"opset": 11}, r"opset 11 is not supported; allowed: 18..23"),
             ({"batch": (4, 2)}, r"batch must be \(min, max\) ints with 1 <= min <= max, got \(4, 2\)"),
             ({"what": "loop", "steps": 2, "sampler": "dpm++"}, r"unknown sampler 'dpm\+\+'")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            export_onnx(pipe, tmp_path / "out", **options)
    unguidable = pipeline("unet")
    with pytest.raises(ValueError, match=r"guidance_scale=3 needs a model trained with a null class"):
        export_onnx(unguidable, tmp_path / "out", what="loop", steps=2, guidance_scale=3.0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match=r"taken exists; choose a new folder or pass overwrite=True"):
        export_onnx(pipe, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written by the refused exports


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ValueError, match=r"could not export the denoiser of tiny-dit \(DiTTransformer2DModel\) to "
                                         r"ONNX: unsupported operator aten::something"):
        export_onnx(pipeline("dit"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_run_inputs(exports):
    pipe, folder = exports["dit"]
    graph = OnnxGraph(folder)
    inputs = network_inputs(pipe, 3)
    cases = [({k: v for k, v in inputs.items() if k != "class_labels"}, r"missing \['class_labels'\]"),
             ({**inputs, "encoder_hidden_states": inputs["sample"]}, r"unexpected \['encoder_hidden_states'\]"),
             ({k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in inputs.items()},
              r"batch 9 is outside the exported range 1..8; export with --batch covering it"),
             ({**inputs, "class_labels": inputs["class_labels"][:2]}, r"the inputs disagree on the batch size"),
             ({**inputs, "sample": inputs["sample"][:, :, :4]}, r"input 'sample' has shape \[3, 2, 4, 8\]; the "
                                                                  r"export takes \['batch', 2, 8, 8\]"),
             ({**inputs, "class_labels": inputs["class_labels"].float()}, r"input 'class_labels' must hold integers")]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            graph(**given)


def test_corrupt_or_mismatched_folders(exports, tmp_path):
    _, source = exports["dit"]
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "export.json").read_text())
    described = {k: v for k, v in manifest.items() if k not in ("format", "files")}
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # truncated after the export
    with pytest.raises(ValueError, match=r"model.onnx does not match export.json .*truncated or replaced"):
        OnnxGraph(folder)
    write_manifest(folder, described)  # a manifest written for the truncated file: ONNX Runtime is the judge
    with pytest.raises(ValueError, match=r"model.onnx: ONNX Runtime cannot load it"):
        OnnxGraph(folder)
    shutil.copy(source / "model.onnx", graph)
    renamed = [{**spec, "name": "x"} if spec["name"] == "sample" else spec for spec in described["inputs"]]
    write_manifest(folder, {**described, "inputs": renamed})
    with pytest.raises(ValueError, match=r"the graph's inputs \['sample', 'timestep', 'class_labels'\] differ from "
                                         r"the manifest's \['x', 'timestep', 'class_labels'\]"):
        OnnxGraph(folder)
    (folder / "export.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ValueError, match=r"export.json: format 'other/9'; this blitzdiff reads 'blitzdiff-onnx/1'"):
        OnnxGraph(folder)
    (folder / "export.json").unlink()
    with pytest.raises(ValueError, match=r"no export.json; an export folder holds model.onnx and export.json"):
        OnnxGraph(folder)
