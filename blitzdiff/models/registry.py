"""Which blitzdiff class runs which diffusers model class; classes are imported only when asked for."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..kernels._backends import ALL_BACKENDS

# diffusers class name (a config.json's `_class_name`) -> "module:attribute" of the blitzdiff class.
MODEL_CLASSES: dict[str, str] = {
    "UNet2DModel": "blitzdiff.models.unet_2d:UNet2DModel",
    "UNet2DConditionModel": "blitzdiff.models.unet_2d_condition:UNet2DConditionModel",
    "DiTTransformer2DModel": "blitzdiff.models.dit:DiT",
    "AutoencoderKL": "blitzdiff.models.vae:AutoencoderKLDecoder",
}
# Class names of older configs that diffusers loads as a current class: Hub DiT checkpoints say Transformer2DModel
# with norm_type "ada_norm_zero", remapped to DiTTransformer2DModel (diffusers' model_loading_utils
# _CLASS_REMAPPING_DICT); DiT.from_config accepts that config and refuses any other norm_type.
LEGACY_CLASSES: dict[str, str] = {"Transformer2DModel": "DiTTransformer2DModel"}
# Checkpoint key prefixes a class leaves out on purpose (the class attribute holding them): our VAE is the decoder
# only, a full AutoencoderKL checkpoint also holds the encoder.
DROPPED_PREFIXES: dict[str, str] = {"AutoencoderKL": "ENCODER_PREFIXES"}


def class_name(name: str) -> str:
    """The supported diffusers class name for `name` (legacy names mapped), or ValueError listing what is supported."""
    name = LEGACY_CLASSES.get(name, name)
    if name not in MODEL_CLASSES:
        raise ValueError(f"unsupported model class {name!r}; supported diffusers classes: "
                         f"{', '.join(sorted(MODEL_CLASSES))} (and legacy {', '.join(sorted(LEGACY_CLASSES))})")
    return name


def model_class(name: str) -> type[nn.Module]:
    """The blitzdiff class that runs diffusers class `name`."""
    name = class_name(name)
    module, _, attribute = MODEL_CLASSES[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    assert cls.diffusers_class == name, (cls, name)
    return cls


def dropped_prefixes(name: str) -> tuple[str, ...]:
    """Checkpoint key prefixes that the class for diffusers class `name` does not load (on purpose)."""
    name = class_name(name)
    return tuple(getattr(model_class(name), DROPPED_PREFIXES[name])) if name in DROPPED_PREFIXES else ()


def default_backend(device: torch.device | str) -> str:
    """The kernel backend `blitzdiff.load` gives a network on `device`: "auto", the fastest measured end to end on
    both devices it has kernels for (elsewhere "auto" runs the specs). On CUDA, sampling SD1.5 fp16 and DiT-XL/2 fp16
    in a CUDA graph on an H200 ran 1.17x and 1.27x faster than on "ref", whose half-precision adaLN / GroupNorm run
    several float32 passes (README "On a GPU"). On the 2-core CPU, where the models call the C++ kernels directly in
    eager sampling and trace the specs under torch.compile, "auto" took 0.89x / 0.84x of "ref"'s time for dit-digits
    at batch 1 / 8 (torch's tanh GELU is slow there) and 0.95x-0.98x for the UNets (benchmarks/
    kernels_auto_vs_ref.py, README "Benchmarks")."""
    del device  # the same answer on every device since the CPU measurements; kept in the signature for callers
    return "auto"


def default_channels_last(device: torch.device | str) -> bool:
    """Whether `blitzdiff.load` stores a network's 4-D (convolution) weights channels-last on `device`: on the CPU,
    where the network then runs NHWC throughout (`pipe.sample`, DPM-Solver++(2M) 10 steps, 2 threads: contiguous
    weights took 1.10x / 1.12x the time for unet-digits at batch 1 / 8 and 1.21x / 1.05x for a 6.5 M-parameter
    UNet2D: benchmarks/bench_cpu_default_path.py, README "CPU: the default path"). Elsewhere the weights stay as
    loaded: on a GPU it is unmeasured."""
    return torch.device(device).type == "cpu"


def set_channels_last(model: nn.Module, channels_last: bool) -> nn.Module:
    """Store `model`'s 4-D weights channels-last (True) or contiguous (False); returns `model`. ValueError, with
    nothing changed, for any other value."""
    if channels_last is not True and channels_last is not False:
        raise ValueError(f"channels_last must be True, False or None (the default), got {channels_last!r}")
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def check_backend(model: nn.Module, backend: str) -> list[nn.Module]:
    """The modules of `model` that call a kernel (have a `backend` attribute); ValueError when `backend` is unknown
    or some of them lack it (a module's KERNEL_BACKENDS: the backends its ops have kernels for)."""
    if backend not in ALL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; backends are {', '.join(ALL_BACKENDS)}")
    modules = [module for module in model.modules() if hasattr(module, "backend")]
    refusing = {f"{type(m).__module__}.{type(m).__qualname__}": m.KERNEL_BACKENDS for m in modules
                if backend not in getattr(m, "KERNEL_BACKENDS", ALL_BACKENDS)}
    if refusing:
        takes = "; ".join(f"{name} takes {', '.join(allowed)}" for name, allowed in refusing.items())
        raise ValueError(f"kernel backend {backend!r} is not available for every layer of {type(model).__name__}: "
                         f"{takes}. 'auto' picks, per op, the fastest backend built for the tensors")
    return modules


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every module of `model` that calls a kernel use `backend`; returns `model`. ValueError, with nothing
    changed, when check_backend refuses it."""
    modules = check_backend(model, backend)
    for module in modules:
        module.backend = backend
    return model
