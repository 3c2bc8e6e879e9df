"""TensorRT engines (blitzdiff.export.trt).

Everywhere: the import guards, and the option checks that come before TensorRT is imported (build_engine, refit_engine,
compare_with_onnxruntime, the compile factory off CUDA), on a tiny random-weight UNet export. With the `tensorrt`
marker (TensorRT, polygraphy and an NVIDIA GPU): engines of a tiny UNet and DiT against their torch forward in float32
(fp32 engines, TF32 off: 1e-4 relative) and in fp16 (at most twice plain PyTorch fp16's error), at each batch profile;
refits; the polygraphy comparison with ONNX Runtime; `pipe.compile("tensorrt")` against the eager pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import blitzdiff
from blitzdiff.export import export_onnx, read_manifest, trt_engine
from blitzdiff.export import trt as engines
from blitzdiff.export.manifest import write_manifest
from blitzdiff.export.onnx import reference_kernels
from blitzdiff.models.presets import build_random

from .test_onnx import DIT, SCHEDULER, UNET, network_inputs, pipeline, relative

INSTALL = r'pip install "blitzdiff\[tensorrt\]"'


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory):
    return export_onnx(pipeline("unet"), tmp_path_factory.mktemp("export") / "unet", batch=(1, 8))


def _rewritten(export, folder, **changes):
    """A copy of an export whose manifest says otherwise (files re-digested, so it verifies)."""
    shutil.copytree(export, folder)
    manifest = read_manifest(folder)
    write_manifest(folder, {k: v for k, v in {**manifest, **changes}.items() if k not in ("format", "files")})
    return folder


def test_nothing_imports_tensorrt_at_import(tmp_path):
    for package in ("tensorrt", "polygraphy"):  # importable stand-ins, so that an import would show here too
        (tmp_path / f"{package}.py").write_text('__version__ = "10.1.0"\n')
    code = ("import sys, blitzdiff.export.trt, blitzdiff.export.trt_engine; "
            "assert not {'tensorrt', 'polygraphy'} & set(sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


@pytest.mark.parametrize("package", ["tensorrt", "polygraphy"])
def test_import_guard_names_the_package_and_the_fix(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    with pytest.raises(ImportError, match=rf"need the {package} package, which is not installed: {INSTALL}") as err:
        engines.require_tensorrt(package)
    assert "\n" not in str(err.value)


def test_build_options_are_checked_before_tensorrt_is_imported(unet_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # a check made after the import would raise ImportError here
    cases = [({"precision": "int8"}, r"unknown precision 'int8'; allowed: fp32, tf32, fp16, bf16"),
             ({"buckets": (0, 2)}, r"buckets must be a non-empty sequence of ints >= 1, got \(0, 2\)"),
             ({"buckets": ()}, r"buckets must be a non-empty sequence of ints >= 1, got \(\)"),
             ({"buckets": (2.0,)}, r"buckets must be .* got \(2.0,\)"),
             ({"buckets": (True,)}, r"buckets must be .* got \(True,\)"),
             ({"buckets": 4}, r"buckets must be .* got 4"),
             ({"buckets": (1, 16, 32)}, r"batch\(es\) \[16, 32\] outside the export's batch range 1..8"),
             ({"workspace_gib": 0}, r"workspace_gib must be a number > 0 or None")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            engines.build_engine(unet_export, tmp_path / "engine", **{"buckets": (1, 8), **options})
    loop = _rewritten(unet_export, tmp_path / "loop", what="loop")
    with pytest.raises(ValueError, match=r"is a 'loop' export; TensorRT engines are built from denoiser or vae "):
        engines.build_engine(loop, tmp_path / "engine")
    inputs = [{**spec, "shape": ["batch", 3, "height", "width"]} if spec["name"] == "sample" else spec
              for spec in read_manifest(unet_export)["inputs"]]
    sized = _rewritten(unet_export, tmp_path / "sized", inputs=inputs)
    with pytest.raises(ValueError, match=r"sized has a dynamic height and width; engines are built for one size"):
        engines.build_engine(sized, tmp_path / "engine", buckets=(1, 8))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match=r"taken exists; choose a new folder or pass overwrite=True"):
        engines.build_engine(unet_export, tmp_path / "taken", buckets=(1, 8))
    with pytest.raises(ImportError, match=INSTALL):  # valid options reach the import, and nothing is left behind
        engines.build_engine(unet_export, tmp_path / "engine", buckets=(1, 8), precision="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "sized", "taken"]


def test_refit_and_compare_refuse_another_export_before_tensorrt_is_imported(unet_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "engine"  # an engine's record, as build_engine writes it (the plan is not read before TensorRT)
    engine.mkdir()
    record = {"format": trt_engine.FORMAT, "export": engines.export_entry(read_manifest(unet_export)),
              "profiles": [1, 8]}
    (engine / "engine.json").write_text(json.dumps(record))
    config = {**read_manifest(unet_export)["model"]["config"], "layers_per_block": 2}
    other = _rewritten(unet_export, tmp_path / "other", model={**read_manifest(unet_export)["model"], "config": config})
    with pytest.raises(ValueError, match=r"other differs from the engine's export in its model config, so its weights "
                                         r"cannot be refit into it"):
        engines.refit_engine(engine, other)
    with pytest.raises(ImportError, match=INSTALL):  # the same network passes the check
        engines.refit_engine(engine, unet_export)
    with pytest.raises(ValueError, match=r"batch 3 has no profile in .*engine; its profiles: \[1, 8\]"):
        engines.compare_with_onnxruntime(unet_export, engine, batch=3, atol=1e-5, rtol=1e-4)
    with pytest.raises(ImportError, match=INSTALL):
        engines.compare_with_onnxruntime(unet_export, engine, batch=8, atol=1e-5, rtol=1e-4)
    files = {"model.onnx": {"bytes": 1, "sha256": "0" * 64}}  # an engine built from other bytes
    (engine / "engine.json").write_text(json.dumps({**record, "export": {**record["export"], "files": files}}))
    with pytest.raises(ValueError, match=r"engine was not built \(or last refit\) from .*unet: their files differ"):
        engines.compare_with_onnxruntime(unet_export, engine, batch=8, atol=1e-5, rtol=1e-4)
    (engine / "engine.json").write_text(json.dumps({**record, "format": "blitzdiff-trt/0"}))
    with pytest.raises(ValueError, match=r"format 'blitzdiff-trt/0'; this blitzdiff reads 'blitzdiff-trt/1'"):
        engines.refit_engine(engine, unet_export)


def test_the_compile_factory_refuses_a_cpu_pipeline():
    with pytest.raises(ValueError, match=r"this pipeline is on cpu: move it to CUDA, or on CPU use "
                                         r"compile\('onnxruntime'\)"):
        engines.network(pipeline("unet"), (1, 2))


# ---- with TensorRT, polygraphy and an NVIDIA GPU ----


def on_cuda(pipe: blitzdiff.Pipeline) -> blitzdiff.Pipeline:
    pipe.model.to("cuda")
    return pipe


def raw(pipe: blitzdiff.Pipeline, n: int, sampler: str, **kwargs) -> torch.Tensor:
    seeds = [5 * i + 1 for i in range(n)]
    labels = [i % pipe.num_classes for i in range(n)]
    return pipe.sample(n, steps=3, sampler=sampler, seeds=seeds, class_labels=labels, output_type="raw",
                       progress=False, **kwargs).cpu()


@pytest.fixture
def full_float32(monkeypatch):
    """Eager CUDA references without TF32, like an fp32 engine."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (CPU pipeline, its export, an fp32 engine with profiles 1 and 5) for the tiny UNet and DiT."""
    root = tmp_path_factory.mktemp("engines")
    made = {}
    for name in ("unet", "dit"):
        pipe = pipeline(name)
        export = export_onnx(pipe, root / name, batch=(1, 8))
        made[name] = pipe, export, engines.build_engine(export, root / f"{name}-fp32", buckets=(1, 5))
    return made


@pytest.mark.tensorrt
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_fp32_engine_matches_torch_at_each_profile(built, name):
    pipe, _, folder = built[name]
    net = engines.TrtNetwork(folder)
    inputs = network_inputs(pipe, 5)
    with torch.no_grad():
        expected = pipe.model(**inputs)  # CPU float32
    cuda = {k: v.cuda() for k, v in inputs.items()}
    assert relative(net(**cuda).cpu(), expected) < 1e-4
    assert relative(net(**{k: v[2:3] for k, v in cuda.items()}).cpu(), expected[2:3]) < 1e-4
    integer_steps = {**cuda, "timestep": cuda["timestep"].round().long()}  # integer plans send int64 timesteps
    with torch.no_grad():
        reference = pipe.model(**{k: v.cpu() for k, v in integer_steps.items()})
    assert relative(net(**integer_steps).cpu(), reference) < 1e-4
    with pytest.raises(ValueError, match=r"batch 3 has no profile in this engine; it was built for batches 1, 5"):
        net(**{k: v[:3] for k, v in cuda.items()})
    record = engines.read_record(folder)
    assert record["profiles"] == [1, 5] and record["precision"] == "fp32" and (folder / "timing.cache").is_file()
    assert [t["name"] for t in record["io"]][-1] == "out_sample" and record["io"][0]["dtype"] == "float32"


@pytest.mark.tensorrt
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_fp16_engine_error_is_at_most_twice_torch_fp16s(built, name, tmp_path):
    pipe, export, _ = built[name]
    net = engines.TrtNetwork(engines.build_engine(export, tmp_path / "fp16", buckets=(5,), precision="fp16"))
    inputs = network_inputs(pipe, 5)
    half = on_cuda(pipeline(name))
    half.model.half()
    with torch.no_grad(), reference_kernels(half.model):  # plain PyTorch ops in float16
        expected = pipe.model(**inputs)
        torch16 = half.model(**{k: v.cuda().half() if k == "sample" else v.cuda() for k, v in inputs.items()})
    torch_error = relative(torch16.float().cpu(), expected)
    engine_error = relative(net(**{k: v.cuda() for k, v in inputs.items()}).cpu(), expected)
    assert 0 < torch_error and engine_error <= 2 * torch_error


def _checkpoint(model: torch.nn.Module, folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": model.diffusers_class, **model.config}))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.tensorrt
def test_refit_engine_runs_the_new_weights(built, tmp_path):
    pipe, export, _ = built["unet"]
    folder = engines.build_engine(export, tmp_path / "engine", buckets=(2,))
    new = blitzdiff.Pipeline(build_random("UNet2DModel", UNET, seed=7), SCHEDULER)
    new_export = export_onnx(new, tmp_path / "new", batch=(1, 8))
    engines.refit_engine(folder, new_export)
    inputs = network_inputs(new, 2)
    with torch.no_grad():
        expected, old = new.model(**inputs), pipe.model(**inputs)
    out = engines.TrtNetwork(folder)(**{k: v.cuda() for k, v in inputs.items()}).cpu()  # the plan was re-serialized
    assert relative(out, expected) < 1e-4 and relative(out, old) > 1e-2
    assert engines.read_record(folder)["export"]["files"] == read_manifest(new_export)["files"]
    with pytest.raises(ValueError, match=r"differs from the engine's export in its inputs"):
        engines.refit_engine(folder, built["dit"][1])


@pytest.mark.tensorrt
def test_compare_with_onnxruntime_passes(built):
    _, export, folder = built["dit"]
    report = engines.compare_with_onnxruntime(export, folder, batch=5, atol=1e-5, rtol=1e-4)
    out = report["outputs"]["out_sample"]
    assert report["passed"] and out["passed"] and out["max_rel"] < 1e-4 and report["batch"] == 5


@pytest.mark.tensorrt
def test_compiled_pipeline_equals_the_eager_one(full_float32, tmp_path):
    eager = on_cuda(pipeline("dit"))
    compiled = on_cuda(pipeline("dit")).compile("tensorrt", buckets=(1, 4))
    for sampler in ("ddim", "dpmpp_2m_sde"):
        for n in (1, 3):  # bucket 1, and bucket 4 with a padding row; guided: batches 2 and 8
            expected = raw(eager, n, sampler, guidance_scale=2.5)
            assert relative(raw(compiled, n, sampler, guidance_scale=2.5), expected) < 1e-3
    described = compiled.runtime_stats()["network"]
    assert described["runtime"] == "tensorrt" and described["profiles"] == [1, 2, 4, 8]
    assert described["engine_dir"] is None and described["build_s"] > 0 and not described["reused"]


@pytest.mark.tensorrt
def test_load_weights_refits_and_an_engine_dir_is_reused(full_float32, tmp_path):
    folder = tmp_path / "engine"
    pipe = on_cuda(pipeline("dit")).compile("tensorrt", buckets=(2,), engine_dir=folder)
    other = build_random("DiTTransformer2DModel", DIT, seed=9)
    pipe.load_weights(_checkpoint(other, tmp_path / "other"))
    expected = raw(on_cuda(blitzdiff.Pipeline(other, SCHEDULER)), 2, "ddim", guidance_scale=2.5)
    assert relative(raw(pipe, 2, "ddim", guidance_scale=2.5), expected) < 1e-3
    again = on_cuda(blitzdiff.Pipeline(build_random("DiTTransformer2DModel", DIT, seed=9), SCHEDULER))
    again.compile("tensorrt", buckets=(2,), engine_dir=folder)
    described = again.runtime_stats()["network"]
    assert described["reused"] and described["build_s"] is None and described["engine_dir"] == str(folder)
    assert relative(raw(again, 2, "ddim", guidance_scale=2.5), expected) < 1e-3
    with pytest.raises(ValueError, match=r"holds an engine that differs in its precision"):
        on_cuda(pipeline("dit")).compile("tensorrt", buckets=(2,), engine_dir=folder, precision="fp16")
