"""Bad input at the public boundary: a ValueError up front that says what was wrong and what is allowed.

Each case must fail before any sampling work (the network is never called), so a slow model never makes the user
wait for an error that the arguments already held.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.engine.inputs import integer_values, seed_values
from blitzdiff.engine.loading import ASSETS, info
from blitzdiff.engine.noise import seed_tensor

from .test_runtime import tiny_model

SCHEDULER = {"_class_name": "DDPMScheduler", "clip_sample": False}


class CountingModel(torch.nn.Module):
    """Wraps a model and counts its calls."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config, self.diffusers_class, self.calls = inner, inner.config, inner.diffusers_class, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.inner(x, t, **cond)


BAD_SAMPLE = {
    "guidance-nan": ({"guidance_scale": math.nan}, r"guidance_scale must be a finite number, got nan"),
    "guidance-inf": ({"guidance_scale": math.inf}, r"guidance_scale must be a finite number, got inf"),
    "guidance-str": ({"guidance_scale": "4"},
                     r"guidance_scale must be a finite number or \d+ of them \(one per sample\), got '4'"),
    "eta-nan": ({"eta": math.nan, "sampler": "ddim"}, r"eta must be a finite number, got nan"),
    "eta-negative": ({"eta": -0.5, "sampler": "ddim"}, r"eta must be >= 0, got -0.5"),
    "eta-too-large": ({"eta": 5.0, "sampler": "ddim"}, r"eta=5 is too large for DDIM at timestep \d+ .* at most"),
    "label-float": ({"class_labels": 3.9}, r"class_labels must be an int or a sequence of ints, got 3.9"),
    "label-float-list": ({"class_labels": [1, 2.0]}, r"class_labels must be an int or a sequence of ints"),
    "label-float-tensor": ({"class_labels": torch.tensor([1.0, 2.0])}, r"class_labels must be integers, got a "
                           r"torch.float32 tensor"),
    "label-bool": ({"class_labels": True}, r"class_labels must be an int or a sequence of ints, got True"),
    "seed-float": ({"seeds": 1.5}, r"seeds must be an int or a sequence of ints, got 1.5"),
    "seed-float-list": ({"seeds": [1.5, 2]}, r"seeds must be an int or a sequence of ints, got \[1.5, 2\]"),
    "seed-str": ({"seeds": "abc"}, r"seeds must be an int or a sequence of ints, got 'abc'"),
    "seed-negative-list": ({"seeds": [-5, 1]}, r"seeds must lie in 0 .. 2\*\*63 - 1, got \[-5\]"),
    "seed-negative": ({"seeds": -1}, r"seeds=-1: an int s gives samples the seeds s .. s \+ 1, which must lie in 0"),
    "seed-2**64": ({"seeds": 2**64}, r"seeds=18446744073709551616: .* must lie in 0 .. 2\*\*63 - 1"),
    "seed-overflow": ({"seeds": 2**63 - 1}, r"seeds=9223372036854775807: an int s gives samples the seeds s .. s \+ 1"),
    "seed-count": ({"seeds": [1, 2, 3]}, r"seeds must be an int or a sequence of 2 ints \(one per sample\), got 3"),
    "steps-zero": ({"steps": 0}, r"steps must be an int >= 1, got 0"),
    "steps-float": ({"steps": 2.5}, r"steps must be an int >= 1, got 2.5"),
    "sampler": ({"sampler": "dpm++"}, r"unknown sampler 'dpm\+\+'; valid samplers: ddim, ddpm"),
}


@pytest.mark.parametrize("case", BAD_SAMPLE, ids=list(BAD_SAMPLE))
def test_bad_sample_arguments_fail_before_any_work(case):
    arguments, message = BAD_SAMPLE[case]
    model = CountingModel(tiny_model())
    pipe = blitzdiff.Pipeline(model, SCHEDULER)
    kwargs = {"steps": 2, "class_labels": [1, 2], "guidance_scale": 2.0, "progress": False, "output_type": "raw",
              **arguments}
    with pytest.raises(ValueError, match=message):
        pipe.sample(2, **kwargs)
    assert model.calls == 0


def test_the_functional_api_checks_its_scalars():
    fn = lambda x, t: x  # noqa: E731
    noise = torch.zeros(1, 2, 4, 4)
    for kwargs, message in (({"guidance_scale": math.nan}, "guidance_scale must be a finite number, got nan"),
                            ({"eta": math.inf, "sampler": "ddim"}, "eta must be a finite number, got inf")):
        with pytest.raises(ValueError, match=message):
            blitzdiff.sample(fn, noise, steps=2, **kwargs)


def test_accepted_integer_forms():
    # The same seeds however they are spelled; the largest seed is usable.
    expected = [3, 4, 5]
    for seeds in (3, [3, 4, 5], (3, 4, 5), range(3, 6), np.arange(3, 6), torch.arange(3, 6), np.int64(3)):
        assert seed_values(seeds, 3) == expected
    assert seed_values(2**63 - 1, 1) == [2**63 - 1] and seed_values(None, 2) == [0, 1]
    assert integer_values("class_labels", np.array([[1], [2]])) == [1, 2]
    pipe = blitzdiff.Pipeline(tiny_model(), SCHEDULER)
    top = pipe.sample(1, steps=2, seeds=2**63 - 1, class_labels=1, output_type="raw", progress=False)
    assert torch.isfinite(top).all()
    ddim_edge = pipe.sample(1, steps=4, sampler="ddim", eta=1.0, class_labels=1, output_type="raw", progress=False)
    assert torch.isfinite(ddim_edge).all()


@pytest.mark.parametrize(("seeds", "batch"), [(None, 3), (0, 1), (7, 4), (2**63 - 2, 1), (2**63 - 3, 2), (2**63 - 1, 1),
                                             ([5, 1, 9], 3), (np.int64(3), 2)])
def test_seed_tensor_holds_the_seed_values(seeds, batch):
    """seed_tensor takes consecutive seeds (an int, None) by arange, others from the list: the values either way,
    up to the largest seed."""
    tensor = seed_tensor(seeds, batch, torch.device("cpu"))
    assert tensor.dtype == torch.int64 and tensor.tolist() == seed_values(seeds, batch)


@pytest.mark.parametrize(("seeds", "message"), [(-1, r"seeds=-1: an int s"), (2**63 - 1, r"seeds=9223372036854775807"),
                                                (True, r"seeds must be an int or a sequence")])
def test_seed_tensor_refuses_what_seed_values_refuses(seeds, message):
    with pytest.raises(ValueError, match=message):
        seed_tensor(seeds, 2, torch.device("cpu"))


@pytest.mark.parametrize("device, message", [
    ("foo", r"device must be one of cpu, cuda(, meta)? \(or cuda:N\), got 'foo'"),  # presets also build on meta
    ("mps", r"device must be one of cpu, cuda(, meta)? \(or cuda:N\), got 'mps'"),
])
def test_bad_devices(device, message):
    with pytest.raises(ValueError, match=message):
        blitzdiff.load("dit-digits", device=device)
    with pytest.raises(ValueError, match=message):
        blitzdiff.load("sd15-unet", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"CUDA is not available here \(.*\); use device='cpu'"):
            blitzdiff.load("unet-digits", device=device)


def test_mistyped_model_names_suggest_the_embedded_ones():
    with pytest.raises(ValueError, match=r"dit-digit: no such file or folder; did you mean 'dit-digits'\? \(embedded "
                                         r"models: dit-digits, unet-digits, dit-digits-pd, .*; random-weight presets: "
                                         r"sd15-unet"):
        blitzdiff.load("dit-digit")
    with pytest.raises(ValueError, match=r"no such file or folder \(embedded models"):
        blitzdiff.load("/nonexistent/model")


@pytest.fixture
def folder(tmp_path):
    target = tmp_path / "dit"
    shutil.copytree(ASSETS / "dit-digits", target)
    return target


def _edit(path, **fields):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


def test_scheduler_field_errors_name_their_file_at_load_and_info(folder):
    scheduler = folder / "scheduler" / "scheduler_config.json"
    _edit(scheduler, beta_schedule="cosine")
    pattern = rf"{scheduler}: DDPMScheduler: beta_schedule='cosine' is not supported"
    with pytest.raises(ValueError, match=pattern):
        blitzdiff.load(folder)
    with pytest.raises(ValueError, match=pattern):
        info(folder)
    # a replacement config skips the folder's; a bad replacement names itself
    assert blitzdiff.load(folder, scheduler_config={"_class_name": "DDIMScheduler"}).sampler_name == "ddim"
    with pytest.raises(ValueError, match=r"scheduler_config: unknown scheduler config field\(s\) \['betas'\]"):
        blitzdiff.load(folder, scheduler_config={"_class_name": "DDIMScheduler", "betas": 1})


def test_info_rejects_what_load_rejects(folder):
    assert info(folder)["class"] == "DiTTransformer2DModel"
    config = folder / "transformer" / "config.json"
    _edit(config, norm_type="layer_norm")
    for call in (blitzdiff.load, info):
        with pytest.raises(ValueError, match=rf"{config}: DiT config: norm_type='layer_norm' is not supported"):
            call(folder)


def test_recommended_guidance(folder):
    assert blitzdiff.load(folder).default_guidance_scale == blitzdiff.load("dit-digits").default_guidance_scale
    _edit(folder / "model_index.json", _blitzdiff_guidance_scale=2.5)
    assert blitzdiff.load(folder).default_guidance_scale == 2.5
    _edit(folder / "model_index.json", _blitzdiff_guidance_scale="high")
    with pytest.raises(ValueError, match=r"model_index.json: _blitzdiff_guidance_scale must be a finite number"):
        blitzdiff.load(folder)
