"""`pipe.compile("onnxruntime")`: the exported network run by ONNX Runtime behind `pipe.sample`, checked against the
plain torch pipeline (no compile) it came from. Guidance, solvers, per-sample noise, buckets, the NaN guard, callbacks
and load_weights must work unchanged on it (ARCHITECTURE.md contract 7)."""

from __future__ import annotations

import pytest
import torch

import blitzdiff
from blitzdiff.engine.network import NonFiniteOutput
from blitzdiff.export.ort_network import OrtNetwork, network
from blitzdiff.models.presets import build_random

from ..engine.test_runtime import _save_checkpoint
from ..engine.test_threads import check_mode
from .test_onnx import DIT, SCHEDULER, network_inputs, pipeline, relative


def raw(pipe: blitzdiff.Pipeline, n: int, sampler: str, **kwargs) -> torch.Tensor:
    seeds = [5 * i + 1 for i in range(n)]
    if pipe.kind.class_conditional:
        kwargs.setdefault("class_labels", [i % pipe.num_classes for i in range(n)])
    return pipe.sample(n, steps=3, sampler=sampler, seeds=seeds, output_type="raw", progress=False, **kwargs)


@pytest.fixture(scope="module")
def dit_pair():
    """(plain torch pipeline, the same weights compiled with onnxruntime, buckets 1 and 4)."""
    return pipeline("dit"), pipeline("dit").compile("onnxruntime", buckets=(1, 4))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "heun"])
def test_guided_samples_equal_the_torch_pipeline(dit_pair, sampler):
    torch_pipe, ort_pipe = dit_pair
    for n in (1, 3, 6):  # bucket 1, bucket 4 with a padding row, and two chunks of the largest bucket
        for scale in (1.0, 2.5):
            expected = raw(torch_pipe, n, sampler, guidance_scale=scale)
            assert relative(raw(ort_pipe, n, sampler, guidance_scale=scale), expected) < 1e-4


def test_unet_and_text_conditional_models(tmp_path):
    unet = pipeline("unet")
    ort_unet = pipeline("unet").compile("onnxruntime", buckets=(2,))
    assert relative(raw(ort_unet, 3, "unipc"), raw(unet, 3, "unipc")) < 1e-4
    sd = pipeline("sd")
    ort_sd = pipeline("sd").compile("onnxruntime", buckets=(2,))
    generator = torch.Generator().manual_seed(0)
    prompts = {"encoder_hidden_states": torch.randn(2, 77, 8, generator=generator),
               "negative_encoder_hidden_states": torch.randn(1, 77, 8, generator=generator), "guidance_scale": 5.0}
    assert relative(raw(ort_sd, 2, "dpmpp_2m", **prompts), raw(sd, 2, "dpmpp_2m", **prompts)) < 1e-4


def test_channels_last_weights_export_the_same_network():
    """blitzdiff.load's CPU default stores convolution weights channels-last: the export must write each weight's
    values, not its storage order (ONNX initializers are dense NCHW)."""
    ort_unet = pipeline("unet").compile("onnxruntime", buckets=(2,), channels_last=True)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in ort_unet.model.parameters())
    assert relative(raw(ort_unet, 2, "dpmpp_2m"), raw(pipeline("unet"), 2, "dpmpp_2m")) < 1e-4


def test_a_float16_pipeline_runs_a_float16_export():
    # The error against the float32 pipeline stays within 2x that of the same pipeline run by torch in float16.
    reference = raw(pipeline("dit"), 3, "dpmpp_2m", guidance_scale=2.0)
    half = blitzdiff.Pipeline(pipeline("dit").model.half(), SCHEDULER)
    torch_error = relative(raw(half, 3, "dpmpp_2m", guidance_scale=2.0), reference)
    ort = blitzdiff.Pipeline(pipeline("dit").model.half(), SCHEDULER).compile("onnxruntime", buckets=(4,))
    assert ort.runtime_stats()["network"]["dtype"] == "float16"
    assert relative(raw(ort, 3, "dpmpp_2m", guidance_scale=2.0), reference) <= max(2 * torch_error, 1e-3)


def test_other_image_sizes_with_a_size_range():
    unet = pipeline("unet")  # 2 resolution levels: sizes are multiples of 2 latent pixels
    ort_unet = pipeline("unet").compile("onnxruntime", buckets=(2,), size=((4, 12), (4, 12)))
    for height, width in ((12, 6), (8, 8), (4, 10)):
        expected = raw(unet, 2, "dpmpp_2m", height=height, width=width)
        assert relative(raw(ort_unet, 2, "dpmpp_2m", height=height, width=width), expected) < 1e-4
    with pytest.raises(ValueError, match=r"height 14 is outside the exported range 4..12; export with a size range"):
        raw(ort_unet, 2, "dpmpp_2m", height=14, width=8)
    fixed = pipeline("unet").compile("onnxruntime", buckets=(2,))
    with pytest.raises(ValueError, match=r"input 'sample' has shape \[2, 3, 6, 8\]; the export takes \['batch', 3, 8, "
                                         r"8\]"):
        raw(fixed, 2, "ddim", height=6)


def test_the_network_equals_the_torch_forward_at_any_batch(dit_pair):
    torch_pipe, ort_pipe = dit_pair
    net = ort_pipe.runtime.network
    assert isinstance(net, OrtNetwork) and net.batch == (1, 8)  # guided calls run twice the largest bucket
    inputs = network_inputs(torch_pipe, 5)
    with torch.no_grad():
        expected = torch_pipe.model(**inputs)
    assert relative(net(**inputs), expected) < 1e-5
    integer_steps = {**inputs, "timestep": inputs["timestep"].round().long()}  # integer plans send int64 timesteps
    with torch.no_grad():
        assert relative(net(**integer_steps)[1:2].clone(), torch_pipe.model(**integer_steps)[1:2]) < 1e-5
    one = net(**{k: v[2:3] for k, v in inputs.items()})
    assert relative(one, expected[2:3]) < 1e-5
    with pytest.raises(ValueError, match=r"batch 9 is outside the exported range 1..8"):
        net(**{k: torch.cat([v, v[:4]]) for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"do not match the export's \['sample', 'timestep', 'class_labels'\]; "
                                         r"missing \['class_labels'\]"):
        net(inputs["sample"], inputs["timestep"])
    with pytest.raises(ValueError, match=r"input 'sample' has shape \[5, 2, 4, 4\]; the export takes \['batch', 2, 8, "
                                         r"8\]"):
        net(**{**inputs, "sample": inputs["sample"][:, :, :4, :4]})


def test_stats_callbacks_and_the_nan_guard(tmp_path):
    pipe = pipeline("dit").compile("onnxruntime", buckets=(2,))
    seen = []
    raw(pipe, 2, "ddim", guidance_scale=1.0, callback=lambda i, t, x: seen.append((i, x.shape[0])))
    assert seen == [(0, 2), (1, 2), (2, 2)]  # before each of the 3 evaluations
    stats = pipe.runtime_stats()
    assert stats["mode"] == "onnxruntime" and stats["entries"][0]["hits"] == 1
    described = stats["network"]
    assert described["runtime"] == "onnxruntime" and described["providers"] == ["CPUExecutionProvider"]
    assert described["batch"] == [1, 4] and described["export_s"] > 0 and not described["kept"]
    broken = pipeline("dit")
    with torch.no_grad():
        broken.model.proj_out_2.bias[0] = float("nan")  # exported with the NaN: ONNX Runtime returns NaN
    broken.compile("onnxruntime", buckets=(2,))
    with pytest.raises(NonFiniteOutput, match=r"the network returned NaN or Inf at evaluation 0"):
        raw(broken, 2, "ddim")


def test_load_weights_re_exports(tmp_path):
    pipe = pipeline("dit").compile("onnxruntime", buckets=(2,))
    before = raw(pipe, 2, "ddim")
    other = build_random("DiTTransformer2DModel", DIT, seed=9)
    pipe.load_weights(_save_checkpoint(other, tmp_path / "other"))
    expected = raw(blitzdiff.Pipeline(other, SCHEDULER), 2, "ddim")
    after = raw(pipe, 2, "ddim")
    assert relative(after, expected) < 1e-4 and relative(after, before) > 1e-2


def test_an_export_dir_is_kept_and_reused_only_for_the_same_weights(tmp_path):
    folder = tmp_path / "ort"
    first = pipeline("dit").compile("onnxruntime", buckets=(2,), export_dir=folder)
    assert (folder / "model.onnx").is_file() and first.runtime_stats()["network"]["kept"]
    again = pipeline("dit").compile("onnxruntime", buckets=(2,), export_dir=folder)
    assert again.runtime_stats()["network"]["export_s"] is None  # opened, not exported again
    assert relative(raw(again, 2, "ddim"), raw(pipeline("dit"), 2, "ddim")) < 1e-4
    other = blitzdiff.Pipeline(build_random("DiTTransformer2DModel", DIT, seed=9), SCHEDULER)
    with pytest.raises(ValueError, match=r"holds another export: its weights \(sha256\) differs from the pipeline's"):
        other.compile("onnxruntime", buckets=(2,), export_dir=folder)
    with pytest.raises(ValueError, match=r"was exported for batch 1..4; these buckets need 1..16"):
        pipeline("dit").compile("onnxruntime", buckets=(8,), export_dir=folder)
    assert other.runtime is None  # a failed compile leaves the pipeline as it was


def test_threads():
    # 8 threads x 50 mixed requests (guided and not, 5 samplers, padded and chunked), bitwise equal to solo results
    check_mode("onnxruntime", buckets=(1, 2, 4))


def test_bad_options():
    pipe = pipeline("dit")
    cases = [({"providers": ["NoSuchExecutionProvider"]}, r"provider\(s\) NoSuchExecutionProvider are not available"),
             ({"cuda_graph": True}, r"cuda_graph=True needs CUDAExecutionProvider first, got CPUExecutionProvider"),
             ({"threads": 0}, r"threads must be an int >= 1, got 0")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            network(pipe, (1, 2), **options)
    with pytest.raises(ValueError, match=r"option\(s\) providers are for the external runtimes \(onnxruntime, "
                                         r"tensorrt\), not mode='eager'"):
        pipe.compile("eager", providers=["CPUExecutionProvider"])
