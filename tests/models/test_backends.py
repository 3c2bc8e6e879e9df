"""Every model with each kernel backend available here matches its `ref` backend within the kernels' error budget.

The budget is the kernel tests' rule applied to the whole network: against a float64 run of the same weights, a
backend's float32 output error is at most 2x the float32 `ref` output's error (plus a floor of a few float32 ulps
of the output's scale, for networks whose ref error is itself at the ulp level), and its output is not bitwise the
`ref` output (some kernel ran). "auto" picks the C++ kernels on CPU where an op has one (GroupNorm, adaLN, timestep
embedding) and ref elsewhere; "triton" runs the Triton kernels, under TRITON_INTERPRET=1 here (tests/conftest.py
sets it when no GPU is usable). Head dims are >= 16, what the attention kernels take.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import blitzdiff
from blitzdiff.models import default_backend, set_backend
from blitzdiff.models.dit import DiT
from blitzdiff.models.unet_2d import UNet2DModel
from blitzdiff.models.unet_2d_condition import UNet2DConditionModel

CONFIGS = {
    "unet2d": (UNet2DModel, {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32),
                             "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 16,
                             "resnet_time_scale_shift": "scale_shift", "num_class_embeds": 4,
                             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                             "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}),
    "unet2d_condition": (UNet2DConditionModel, {"sample_size": 8, "in_channels": 4, "out_channels": 4,
                                                "block_out_channels": (32, 64), "layers_per_block": 1,
                                                "norm_num_groups": 8, "attention_head_dim": 2,
                                                "cross_attention_dim": 16,
                                                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}),
    "dit": (DiT, {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
                  "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}),
}
BACKENDS = ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e '.[triton]')"))]


def build(name: str) -> tuple[torch.nn.Module, dict]:
    cls, config = CONFIGS[name]
    model = cls.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # every weight non-trivial (zero-initialized output layers included)
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    batch = 2
    x = torch.randn(batch, config["in_channels"], 8, 8, generator=gen)
    kwargs = {"class_labels": torch.tensor([1, 3])} if name != "unet2d_condition" else {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=gen)}
    return model, {"sample": x, "timestep": torch.tensor([10, 900]), **kwargs}


def run(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model.to(dtype)(**cast).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_backend_matches_ref_within_budget(name, backend):
    model, inputs = build(name)
    exact = run(copy.deepcopy(model), inputs, torch.float64)
    ref = run(set_backend(copy.deepcopy(model), "ref"), inputs, torch.float32)
    ref_error = (ref - exact).abs().max().item()
    fused = run(set_backend(copy.deepcopy(model), backend), inputs, torch.float32)
    error = (fused - exact).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert error <= 2 * ref_error + floor, f"{name} on {backend}: error {error:.3g}, ref's {ref_error:.3g}"
    # The budget alone would pass a backend that ran the spec everywhere; a kernel rounds differently somewhere.
    assert not torch.equal(fused, ref), f"{name} on {backend}: bitwise the ref output, so no kernel ran"


def kernel_backends(model: torch.nn.Module) -> set[str]:
    return {module.backend for module in model.modules() if hasattr(module, "backend")}


def test_load_gives_the_measured_default_per_device():
    assert default_backend("cpu") == "auto" and default_backend(torch.device("cuda", 0)) == "auto"
    assert kernel_backends(blitzdiff.load("unet-digits").model) == {"auto"}
    assert kernel_backends(blitzdiff.load("dit-digits").model) == {"auto"}


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["unet-digits", "dit-digits"])
def test_load_on_cuda_runs_the_fused_kernels(name):
    assert kernel_backends(blitzdiff.load(name, device="cuda").model) == {"auto"}
