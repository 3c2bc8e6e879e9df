"""Checkpoints on disk -> blitzdiff models: diffusers model and pipeline folders, original DiT checkpoints.

gpt-fast style: the model is built with its parameters on the meta device, the checkpoint's keys and shapes are
checked against it from the file headers (before any tensor data is read), then each tensor is read (safetensors
maps the file) and converted to the target dtype and device on its own, and assigned with
`load_state_dict(strict=True, assign=True)`: peak memory is the model plus one tensor.

Pickled checkpoints (.bin, .pt, .pth, .ckpt) can run arbitrary code when unpickled: they are refused unless the
caller passes allow_pickle=True, and then read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import math
import re
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from .dit_original import original_dit_config, original_dit_to_diffusers
from .placement import resolve_device, resolve_dtype
from .registry import class_name, dropped_prefixes, model_class

WEIGHTS = "diffusion_pytorch_model"  # diffusers' weights file stem (its SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DENOISERS = ("unet", "transformer")  # pipeline components that hold the denoising network, in lookup order
# A variant (diffusers' save_pretrained(variant=...)): diffusion_pytorch_model.fp16.safetensors, or for a sharded
# one the index diffusion_pytorch_model.safetensors.index.fp16.json. Shard names have a dash, so never match.
_VARIANT = re.compile(rf"{WEIGHTS}\.\w+\.safetensors|{WEIGHTS}\.safetensors\.index\.\w+\.json")
_DTYPES = {  # safetensors header dtype -> torch dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
# Config fields describe() reports when the config has them.
SUMMARY_FIELDS = ("sample_size", "in_channels", "out_channels", "latent_channels", "scaling_factor",
                  "cross_attention_dim", "num_class_embeds", "num_embeds_ada_norm")


@dataclass(frozen=True)
class PipelineFiles:
    """What a diffusers pipeline folder (model_index.json) holds, for blitzdiff's Pipeline."""

    root: Path
    model_index: dict[str, Any]
    components: tuple[str, ...]  # model_index entries that name a class (e.g. unet, vae, scheduler)
    denoiser: Path  # root / "unet" or root / "transformer"
    denoiser_class: str  # its diffusers class, legacy names mapped (e.g. "DiTTransformer2DModel")
    scheduler_config: dict[str, Any] | None  # scheduler/scheduler_config.json
    vae: Path | None  # root / "vae"


@dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor: its file and header metadata; `read()` returns the data."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class _Source:
    """A resolved checkpoint: the model class and config, and its tensors under the names the model uses."""

    kind: str  # "diffusers model" | "original DiT checkpoint"
    weights: Path  # the weights file or shard index
    stored: dict[str, _Tensor]  # the tensors as stored in the files
    tensors: dict[str, _Tensor]  # what the model loads: renamed (original DiT), without dropped prefixes (VAE)
    class_name: str
    config: dict[str, Any]
    config_source: str  # where the config comes from, for messages


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, _Tensor]:
    try:  # safe_open checks the header against the file size: truncated or garbage files fail here
        handle = safe_open(path, framework="pt")
        slices = {key: handle.get_slice(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    return {key: _Tensor(path, tuple(s.get_shape()), _DTYPES.get(s.get_dtype(), s.get_dtype()),
                         partial(handle.get_tensor, key)) for key, s in slices.items()}


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, _Tensor]:
    if not allow_pickle:
        raise ValueError(f"{path}: refusing to unpickle a checkpoint (unpickling can run arbitrary code); convert it "
                         "to safetensors, or pass allow_pickle=True to read it with torch.load(weights_only=True)")
    try:  # mmap needs torch.save's zip format; legacy-format files are read into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch.load's errors span pickle, zip, EOF and runtime types
        raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]  # a DiT training checkpoint: sample from the EMA weights (DiT's find_model)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else _first(
            [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)])
        raise ValueError(f"{path}: not a state dict of tensors; found {found}")
    return {key: _Tensor(path, tuple(t.shape), str(t.dtype).removeprefix("torch."), partial(lambda t: t, t))
            for key, t in state.items()}


def _read_index(path: Path, allow_pickle: bool) -> dict[str, _Tensor]:
    """A sharded checkpoint: {"weight_map": {key: shard file}} beside its shards."""
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: a shard index needs a 'weight_map' object (tensor name -> shard file)")
    tensors: dict[str, _Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path.parent / shard).is_file():
            raise ValueError(f"{path}: shard {shard} is missing")
        for key, tensor in _read_file(path.parent / shard, allow_pickle).items():
            if key in tensors:
                raise ValueError(f"{path}: {key!r} is in two shards, {tensors[key].file.name} and {shard}")
            tensors[key] = tensor
    misplaced = sorted(k for k, shard in weight_map.items() if k not in tensors or tensors[k].file.name != shard)
    if misplaced:
        raise ValueError(f"{path}: {len(misplaced)} tensor(s) not in the shard the index names: {_first(misplaced)}")
    return tensors


def _read_file(path: Path, allow_pickle: bool) -> dict[str, _Tensor]:
    if path.name.endswith(".json"):
        return _read_index(path, allow_pickle)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle)
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, a shard index (.json), or a "
                     f"pickle ({', '.join(PICKLE_SUFFIXES)}) with allow_pickle=True")


def _find_weights(folder: Path) -> Path:
    """The weights of a diffusers model folder: safetensors (single, sharded, or the one variant), else pickles."""
    for name in (f"{WEIGHTS}.safetensors", f"{WEIGHTS}.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    variants = sorted(p for p in folder.iterdir() if _VARIANT.fullmatch(p.name))
    if len(variants) > 1:
        raise ValueError(f"{folder}: several weight variants ({', '.join(p.name for p in variants)}); pass the path "
                         "of the one to load")
    if variants:
        return variants[0]
    for name in (f"{WEIGHTS}.bin", f"{WEIGHTS}.bin.index.json"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: no diffusers weights ({WEIGHTS}.safetensors, its shard index "
                     f"{WEIGHTS}.safetensors.index.json, or a variant such as {WEIGHTS}.fp16.safetensors)")


# Checkpoints saved before diffusers 0.14 (e.g. google/ddpm-*) name the attention projections of UNet / VAE
# attention blocks query / key / value / proj_attn; diffusers renames them when loading, and so do we.
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_name(key: str) -> str:
    match = _LEGACY_ATTENTION.match(key)
    if match is None:
        return key
    block, projection, kind = match.groups()
    return f"{block}.{_LEGACY_NAMES[projection]}.{kind}"


def _diffusers_source(folder: Path, allow_pickle: bool, weights: Path | None = None,
                      stored: dict[str, _Tensor] | None = None) -> _Source:
    """A diffusers model folder, its weights found there or given (`weights`, already read as `stored`)."""
    config_file = folder / "config.json"
    config = _read_json(config_file)
    try:
        name = class_name(config.get("_class_name", "(no _class_name)"))
        dropped = dropped_prefixes(name)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    weights = weights or _find_weights(folder)
    stored = _read_file(weights, allow_pickle) if stored is None else stored
    tensors = {_current_name(key): t for key, t in stored.items() if not key.startswith(dropped)}
    return _Source("diffusers model", weights, stored, tensors, name, config, str(config_file))


def _original_dit_source(path: Path, stored: dict[str, _Tensor], image_size: int | None) -> _Source:
    # Config and key mapping from meta tensors (headers only); the data is converted once, when first read.
    meta = {key: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for key, t in stored.items()}
    try:
        config = original_dit_config(meta, image_size=image_size)
        renamed = original_dit_to_diffusers(meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

    @cache
    def converted() -> dict[str, torch.Tensor]:
        return original_dit_to_diffusers({key: t.read() for key, t in stored.items()})

    tensors = {key: _Tensor(path, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                            partial(lambda key: converted()[key], key)) for key, t in renamed.items()}
    return _Source("original DiT checkpoint", path, stored, tensors, "DiTTransformer2DModel", config,
                   f"the config inferred from {path.name}")


def _source(path: str | Path, allow_pickle: bool, image_size: int | None = None) -> _Source:
    """Resolve a model folder, a pipeline folder (its denoiser), or a single checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            path = read_pipeline(path).denoiser
        elif not (path / "config.json").is_file():
            raise ValueError(f"{path}: neither a diffusers model folder (config.json) nor a pipeline folder "
                             "(model_index.json)")
        source = _diffusers_source(path, allow_pickle)
    elif path.is_file():
        stored = _read_file(path, allow_pickle)
        # facebookresearch/DiT names its patch embedder x_embedder (diffusers: pos_embed)
        if "x_embedder.proj.weight" in stored:
            return _original_dit_source(path, stored, image_size)
        if not (path.parent / "config.json").is_file():
            raise ValueError(f"{path}: not an original DiT checkpoint (no x_embedder.* keys) and no config.json "
                             "beside it; pass a diffusers model or pipeline folder")
        source = _diffusers_source(path.parent, allow_pickle, path, stored)
    else:
        raise ValueError(f"{path}: no such file or folder")
    if image_size is not None:
        raise ValueError(f"{path}: image_size applies to original DiT checkpoints only (a diffusers config sets "
                         "sample_size)")
    return source


def _build(source: _Source) -> nn.Module:
    """The model from its config, parameters on the meta device, buffers computed for real.

    Parameters go to the meta device as they are registered (the checkpoint supplies them); buffers are computed,
    since non-persistent ones are in no checkpoint. This is accelerate's init_empty_weights(include_buffers=False),
    which diffusers loads with, restricted to this thread.
    """
    thread = threading.get_ident()

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or threading.get_ident() != thread:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        return model_class(source.class_name).from_config(source.config)
    except ValueError as err:
        raise ValueError(f"{source.config_source}: {err}") from err
    finally:
        handle.remove()


def _check(model: nn.Module, source: _Source) -> None:
    """Keys and shapes of the checkpoint against the model, from headers only: every problem in one message."""
    expected = model.state_dict()
    tensors = source.tensors
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    mismatched = [key for key in expected if key in tensors and tuple(expected[key].shape) != tensors[key].shape]
    problems = [f"{len(missing)} missing key(s): {_first(missing)}"] if missing else []
    problems += [f"{len(unexpected)} unexpected key(s): {_first(unexpected)}"] if unexpected else []
    problems += [f"shape mismatch for {key!r} in {tensors[key].file.name}: checkpoint {list(tensors[key].shape)}, "
                 f"the config gives {list(expected[key].shape)}" for key in mismatched[:5]]
    problems += [f"... {len(mismatched) - 5} more shape mismatch(es)"] if len(mismatched) > 5 else []
    if problems:
        raise ValueError(f"{source.weights} does not fit the {source.class_name} of {source.config_source}: "
                         + "; ".join(problems))


def load_model(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               allow_pickle: bool = False, image_size: int | None = None) -> nn.Module:
    """A blitzdiff model, in eval mode, from a checkpoint on disk.

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors, its shard index, or one
    variant), a diffusers pipeline folder (model_index.json: its unet/ or transformer/), a weights file beside its
    config.json, or an original facebookresearch/DiT checkpoint (.safetensors, or .pt with allow_pickle; its config
    is inferred, `image_size` in pixels where it has no pos_embed). Floating-point tensors are converted to `dtype`
    (default float32), everything goes to `device` (default CPU). Errors are ValueErrors naming the file.
    """
    if str(device) == "meta":
        raise ValueError("device='meta' would discard the weights; build the class on the meta device instead")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    source = _source(path, allow_pickle, image_size)
    model = _build(source)
    _check(model, source)
    converted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (source, converted): shared stays shared
    state = {}
    for key in model.state_dict():
        tensor = source.tensors[key].read()
        if id(tensor) not in converted:
            dt = dtype if tensor.is_floating_point() else tensor.dtype
            converted[id(tensor)] = tensor, tensor.to(device=device, dtype=dt)
        state[key] = converted[id(tensor)][1]
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)  # the buffers computed at construction
    assert not any(t.is_meta for t in chain(model.parameters(), model.buffers())), "strict load left meta tensors"
    return model.eval()


def read_pipeline(path: str | Path) -> PipelineFiles:
    """The files of a diffusers pipeline folder; ValueError naming the file when one is missing or unsupported."""
    root = Path(path)
    model_index = _read_json(root / "model_index.json")
    # Component entries are [library, class]; [null, null] marks an absent optional one (e.g. safety_checker).
    components = tuple(name for name, spec in model_index.items()
                       if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1])
    denoiser = next((name for name in DENOISERS if name in components), None)
    if denoiser is None:
        raise ValueError(f"{root / 'model_index.json'}: no denoiser ({' or '.join(DENOISERS)}) among its components "
                         f"({', '.join(components) or 'none'})")
    config_file = root / denoiser / "config.json"
    try:
        denoiser_class = class_name(_read_json(config_file).get("_class_name", "(no _class_name)"))
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from err
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json") if "scheduler" in components else None
    vae = root / "vae" if "vae" in components else None
    return PipelineFiles(root, model_index, components, root / denoiser, denoiser_class, scheduler, vae)


def load_component(path: str | Path, name: str, **kwargs: Any) -> nn.Module:
    """The model of pipeline component `name` (e.g. "vae"); keyword arguments as for load_model."""
    files = read_pipeline(path)
    if name not in files.components:
        raise ValueError(f"{files.root}: pipeline has no component {name!r}; it has {', '.join(files.components)}")
    return load_model(files.root / name, **kwargs)


def summary_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields `describe` shows (SUMMARY_FIELDS that are set)."""
    return {k: config[k] for k in SUMMARY_FIELDS if config.get(k) is not None}


def _summary(source: _Source, root: Path) -> dict[str, Any]:
    _check(_build(source), source)  # what load_model checks before reading data: config fields, keys, shapes
    files = [source.weights, *sorted({t.file for t in source.stored.values()} - {source.weights})]
    sizes = {str(f.relative_to(root)): f.stat().st_size for f in files}
    return {
        "format": source.kind, "class": source.class_name,
        "parameters": sum(math.prod(t.shape) for t in source.stored.values()),
        "dtypes": sorted({t.dtype for t in source.stored.values()}),
        "files": sizes, "bytes": sum(sizes.values()),
        "config": summary_config(source.config),
    }


def describe(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What a checkpoint holds, from its configs and file headers (no tensor data is read from safetensors).

    Keys: path, format, class (diffusers class), parameters (element count of the stored tensors), dtypes, files
    ({path: bytes}), bytes, config (sample size, channels, ...); for a pipeline folder also pipeline (its class),
    components, scheduler (class name or None) and vae (the same keys, or None).
    """
    path = Path(path)
    if not (path.is_dir() and (path / "model_index.json").is_file()):
        root = path if path.is_dir() else path.parent
        return {"path": str(path), **_summary(_source(path, allow_pickle), root)}
    files = read_pipeline(path)
    info = {"path": str(path), **_summary(_source(files.denoiser, allow_pickle), path), "format": "diffusers pipeline"}
    info["pipeline"] = files.model_index.get("_class_name")
    info["components"] = list(files.components)
    info["scheduler"] = files.scheduler_config.get("_class_name") if files.scheduler_config is not None else None
    info["vae"] = _summary(_source(files.vae, allow_pickle), path) if files.vae is not None else None
    return info
