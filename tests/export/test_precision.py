"""float16 exports on ONNX Runtime's CPU provider: the precision policy (what stays float32) read from the graph
itself, the error against the float32 torch model bounded by plain PyTorch float16's (flash-attention's test rule:
at most 2x plain PyTorch at the same precision), float32 loop state around a float16 network, inputs of the wrong
precision refused, and the weights digest of the manifest."""

from __future__ import annotations

import collections
import copy

import onnx
import pytest
import torch
from torch import nn

import blitzdiff
from blitzdiff.export import OnnxGraph, export_onnx, read_manifest
from blitzdiff.export.manifest import weights_digest
from blitzdiff.export.precision import FLOAT32_OPS, in_dtype

from .test_onnx import network_inputs, pipeline, relative

FLOOR = 1e-3  # relative error allowed whatever plain PyTorch's: about two float16 ulps of the largest output
LOOP_SAMPLERS = ("ddim", "dpmpp_2m_sde")  # deterministic, stochastic
SEEDS, LABELS = [11, 3, 7], [0, 4, 2]


def half_pipeline(name: str) -> blitzdiff.Pipeline:
    """pipeline(name) with its networks converted to float16 in place (plain PyTorch float16, reference kernels)."""
    pipe = pipeline(name)
    pipe.model.half()
    if pipe.vae is not None:
        pipe.vae.half()
    return pipe


def half(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float16 network's inputs: sample and prompt embeddings in float16; timestep float32, labels int64."""
    return {k: v.half() if k in ("sample", "encoder_hidden_states", "latent_sample") else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> export folder: float16 denoisers of UNet2D and DiT converted from float32 pipelines, the SD UNet and
    its VAE decoder from a float16 pipeline (dtype=None), and float16 guided DiT loops."""
    root = tmp_path_factory.mktemp("half")
    made = {name: export_onnx(pipeline(name), root / name, dtype="float16", batch=(1, 8)) for name in ("unet", "dit")}
    sd = half_pipeline("sd")
    made["sd"] = export_onnx(sd, root / "sd", batch=(1, 8))
    made["vae"] = export_onnx(sd, root / "vae", what="vae", batch=(1, 8))
    for sampler in LOOP_SAMPLERS:
        made[sampler] = export_onnx(pipeline("dit"), root / sampler, what="loop", sampler=sampler, steps=3,
                                    guidance_scale=2.0, dtype=torch.float16, batch=(1, 4))
    return made


def input_types(path) -> tuple[onnx.GraphProto, dict[str, int]]:
    """The graph (weights not loaded) and the element type of every value, by onnx.shape_inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return graph, types


FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
EXPECTED_OPS = {"unet": {"group_norm", "attention_softmax", "timestep_embedding"},
                "dit": {"layer_norm", "attention_softmax", "timestep_embedding"},
                "sd": set(FLOAT32_OPS), "vae": {"group_norm", "attention_softmax"},
                "ddim": {"layer_norm", "attention_softmax", "timestep_embedding"}}


@pytest.mark.parametrize("name", list(EXPECTED_OPS))
def test_the_policy_ops_run_in_float32_and_the_rest_in_float16(exports, name):
    graph, types = input_types(exports[name] / "model.onnx")
    op_policy = {op: policy for policy, ops in FLOAT32_OPS.items() for op in ops} | {"ReduceMean": "statistics"}
    seen, half_compute = collections.Counter(), 0
    for node in graph.node:
        kind = types.get(node.input[0]) if node.input else None
        if node.op_type in op_policy and kind in (FLOAT, FLOAT16):
            assert kind == FLOAT, f"{name}: {node.op_type} {node.name} takes float16; its policy is float32"
            seen[op_policy[node.op_type]] += 1
        half_compute += node.op_type in ("Conv", "MatMul", "Gemm") and kind == FLOAT16
    assert set(seen) == EXPECTED_OPS[name]  # each policy entry this network uses is present, none vacuous
    assert half_compute > 0  # the network itself runs in float16
    assert read_manifest(exports[name])["precision"] == {"dtype": "float16", "float32_ops": list(FLOAT32_OPS)}


@pytest.mark.parametrize("name", ["unet", "dit", "sd", "vae"])
def test_float16_error_is_at_most_twice_plain_pytorch(exports, name):
    reference, plain = pipeline("sd" if name == "vae" else name), half_pipeline("sd" if name == "vae" else name)
    if name == "vae":
        inputs = {"latent_sample": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
        with torch.no_grad():
            expected = reference.vae.decode(inputs["latent_sample"])
            torch16 = plain.vae.decode(inputs["latent_sample"].half())
    else:
        inputs = network_inputs(reference, 3)
        with torch.no_grad():
            expected, torch16 = reference.model(**inputs), plain.model(**half(inputs))
    out = OnnxGraph(exports[name])(**half(inputs))
    assert out.dtype == torch.float16 and torch16.dtype == torch.float16
    onnx_error, torch_error = relative(out.float(), expected), relative(torch16.float(), expected)
    assert 0 < onnx_error <= max(2 * torch_error, FLOOR), (onnx_error, torch_error)


@pytest.mark.parametrize("sampler", LOOP_SAMPLERS)
def test_float16_loop_error_is_at_most_twice_plain_pytorch(exports, sampler):
    manifest = read_manifest(exports[sampler])
    dtypes = {spec["name"]: spec["dtype"] for spec in manifest["inputs"] + manifest["outputs"]}
    assert dtypes == {"noise": "float32", "seeds": "int64", "class_labels": "int64", "guidance_scale": "float32",
                      "sample": "float32"}  # the state stays float32; only the network is float16
    options = dict(steps=3, sampler=sampler, seeds=SEEDS, class_labels=LABELS, guidance_scale=2.0, output_type="raw",
                   progress=False)
    reference = pipeline("dit")
    expected = reference.sample(3, **options)
    torch16 = half_pipeline("dit").sample(3, **options)
    seeds = torch.tensor(SEEDS)
    out = OnnxGraph(exports[sampler])(noise=reference.initial_noise(seeds, (2, 8, 8)), seeds=seeds,
                                      class_labels=torch.tensor(LABELS), guidance_scale=torch.tensor(2.0))
    onnx_error, torch_error = relative(out, expected), relative(torch16, expected)
    assert out.dtype == torch.float32 and 0 < onnx_error <= max(2 * torch_error, FLOOR), (onnx_error, torch_error)


def test_the_pipeline_is_not_changed_and_copied_only_when_needed(tmp_path):
    pipe = pipeline("unet")
    before = weights_digest(pipe.model)
    folder = export_onnx(pipe, tmp_path / "unet", dtype="float16", batch=(1, 2))
    assert pipe.dtype == torch.float32 and weights_digest(pipe.model) == before
    model = read_manifest(folder)["model"]
    assert model["dtype"] == "float16"
    assert model["weights_sha256"] == weights_digest(copy.deepcopy(pipe.model).half())  # the weights as exported
    assert in_dtype(pipe.model, torch.float32) is pipe.model
    converted = in_dtype(pipe.model, torch.float16)
    assert converted is not pipe.model and {p.dtype for p in converted.parameters()} == {torch.float16}
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(converted.parameters(), pipe.model.parameters(),
                                                             strict=True))


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_dtypes(tmp_path):
    pipe = pipeline("unet")
    message = r"bfloat16 exports are not supported: ONNX's Conv takes bfloat16 only from opset 22, .* export float16"
    for dtype in ("bfloat16", torch.bfloat16):
        with pytest.raises(ValueError, match=message):
            export_onnx(pipe, tmp_path / "out", dtype=dtype)
    bf16 = pipeline("unet")
    bf16.model.bfloat16()
    with pytest.raises(ValueError, match=message):  # dtype=None: the pipeline's
        export_onnx(bf16, tmp_path / "out")
    for dtype in ("float64", "int8", torch.int8):
        with pytest.raises(ValueError, match=r"dtype .* is not supported for export; allowed: float32, float16"):
            export_onnx(pipe, tmp_path / "out", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


def test_inputs_of_the_wrong_precision(exports):
    denoiser = OnnxGraph(exports["unet"])
    inputs = network_inputs(pipeline("unet"), 2)
    with pytest.raises(ValueError, match=r"input 'sample' is float32; the export takes float16 \(a cast would round\): "
                                         r"convert it first, e.g. x.to\(torch.float16\)"):
        denoiser(**inputs)
    loop = OnnxGraph(exports["ddim"])
    seeds = torch.tensor(SEEDS)
    noise = pipeline("dit").initial_noise(seeds, (2, 8, 8)).half()  # float16 values: exact in float32
    rest = {"seeds": seeds, "class_labels": torch.tensor(LABELS)}
    out = loop(noise=noise, guidance_scale=2.0, **rest)  # a Python number takes the input's dtype
    assert torch.equal(out, loop(noise=noise.float(), guidance_scale=torch.tensor(2.0), **rest))
    rounded = noise.bfloat16()  # bfloat16 values: exact in float32 too
    assert torch.equal(loop(noise=rounded, guidance_scale=2, **rest), loop(noise=rounded.float(), guidance_scale=2.0,
                                                                          **rest))
    with pytest.raises(ValueError, match=r"input 'noise' is float64; the export takes float32 \(a cast would round\)"):
        loop(noise=noise.double(), guidance_scale=2.0, **rest)
    with pytest.raises(ValueError, match=r"input 'guidance_scale' is float64; the export takes float32"):
        loop(noise=noise, guidance_scale=torch.tensor(2.0, dtype=torch.float64), **rest)
    labels = torch.tensor(LABELS, dtype=torch.int32)  # integers: exact in int64
    assert torch.equal(out, loop(noise=noise, guidance_scale=2.0, seeds=seeds, class_labels=labels))


# -- weights digest ----------------------------------------------------------------------------------------------


def test_weights_digest_changes_with_any_weight_and_only_then():
    model = pipeline("unet").model
    digest = weights_digest(model)
    assert digest == weights_digest(pipeline("unet").model)  # the same weights in another module: the same digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    name, weight = sorted(model.state_dict().items())[-1]
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
        assert weights_digest(model) != digest, name
        weight.view(-1)[0] -= 1e-3
    assert weights_digest(model) == digest
    assert weights_digest(copy.deepcopy(model).half()) != digest  # dtypes count
    flat, square = nn.Linear(4, 1, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        square.weight.copy_(flat.weight.reshape(2, 2))
    assert weights_digest(flat) != weights_digest(square)  # the same bytes in another shape
    renamed = nn.Sequential(nn.Identity(), flat)
    assert weights_digest(renamed) != weights_digest(nn.Sequential(flat))  # names count: "1.weight" vs "0.weight"
