"""Where a Pipeline comes from: `blitzdiff.load(path)` (a checkpoint folder, an embedded model by name, or a
random-weight preset), the names it accepts, the checks a folder passes before it loads, and `blitzdiff info`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from ..models import (
    PRESETS,
    build_preset,
    default_backend,
    default_channels_last,
    describe,
    load_model,
    pack_projections,
    read_pipeline,
    set_backend,
    set_channels_last,
)
from ..models.checkpoint import summary_config
from .config import CLASS_DEFAULTS, read_config, resolve
from .inputs import finite_number
from .pipeline import Pipeline

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = ("dit-digits", "unet-digits",  # folders under blitzdiff/assets, trained by scripts/train_default_models.py
            "dit-digits-pd", "dit-digits-pd2", "dit-digits-pd4", "dit-digits-cd")  # scripts/train_few_step_students.py
DEFAULT_MODEL = "dit-digits"


def model_path(path: str | Path | None) -> Path:
    """A checkpoint path, or the name of an embedded model (EMBEDDED: "dit-digits", ...; None means the default).
    A path that does not exist is a ValueError listing the names, with the closest one when it looks mistyped."""
    if path is None:
        path = DEFAULT_MODEL
    if isinstance(path, str) and path in EMBEDDED:
        return ASSETS / path
    if not Path(path).exists():
        close = difflib.get_close_matches(str(path), (*EMBEDDED, *PRESETS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{path}: no such file or folder{hint} (embedded models: {', '.join(EMBEDDED)}; "
                         f"random-weight presets: {', '.join(PRESETS)})")
    return Path(path)


def check_scheduler_config(config: dict[str, Any], source: str | Path) -> None:
    """Resolve a scheduler config of a class blitzdiff runs, so that a bad field fails at load time naming its file
    (`source`); a class blitzdiff lacks (e.g. PNDMScheduler) loads, and sample() then needs sampler=."""
    if config.get("_class_name", "DDPMScheduler") not in CLASS_DEFAULTS:
        return
    try:
        resolve(None, config)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def info(path: str | Path | None = None) -> dict[str, Any]:
    """What `blitzdiff info` prints: blitzdiff.models.describe of a checkpoint (or an embedded model by name), with
    the same checks as load(): the model config, keys and shapes, and the scheduler config. A preset name describes
    the architecture, built on the meta device (nothing allocated)."""
    if isinstance(path, str) and path in PRESETS:
        model, scheduler_config = build_preset(path, device="meta")
        return {"path": path, "format": "random-weight preset (built on load, nothing stored)",
                "class": model.diffusers_class, "parameters": sum(p.numel() for p in model.parameters()),
                "dtypes": ["float32"], "config": summary_config(model.config),
                "scheduler": scheduler_config["_class_name"]}
    path = model_path(path)
    info = describe(path)
    if info.get("scheduler") is not None:
        config_file = path / "scheduler" / "scheduler_config.json"
        check_scheduler_config(read_config(config_file), config_file)
    return info


def load(
    path: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    scheduler_config: dict[str, Any] | str | Path | None = None,
    vae: str | Path | None = None,
    allow_pickle: bool = False,
    channels_last: bool | None = None,
) -> Pipeline:
    """A Pipeline from a checkpoint on disk, an embedded model by name (None: the default, dit-digits), or a
    random-weight architecture for speed work by preset name ("sd15-unet", "dit-xl-2-256", "dit-xl-2-512":
    blitzdiff.models.presets; no VAE, sample with output_type="raw").

    path: a diffusers pipeline folder (model_index.json with unet/ or transformer/, scheduler/, optional vae/), a
    bare model folder, or an original DiT checkpoint (see blitzdiff.models.load_model). scheduler_config replaces the
    folder's (a bare model has none: DDPM's defaults, linear betas over 1000 steps, as DDPM and DiT were trained,
    unless given). vae: a VAE folder for a bare latent model. dtype: the networks' dtype (default float32); the
    sampler state stays float32. Pickled weights are refused unless allow_pickle=True. The networks run the kernel
    backend measured fastest on their device (blitzdiff.models.default_backend: "auto", on CUDA and on the CPU);
    `pipe.compile(kernels=...)` or blitzdiff.models.set_backend changes it. channels_last: store the networks' 4-D
    weights channels-last (True) or contiguous (False); None: the layout measured faster on their device
    (blitzdiff.models.default_channels_last: channels-last on the CPU, as loaded elsewhere);
    `pipe.compile(channels_last=...)` changes it later.
    """
    if scheduler_config is not None:
        given_config = read_config(scheduler_config)
        check_scheduler_config(given_config, scheduler_config if isinstance(scheduler_config, (str, Path))
                               else "scheduler_config")
    if isinstance(path, str) and path in PRESETS:
        model, preset_config = build_preset(path, device=device, dtype=dtype)
        config = preset_config if scheduler_config is None else given_config
        return Pipeline(with_device_defaults(model, channels_last), config, None, name=path)
    path = model_path(path)
    options = {"device": device, "dtype": dtype, "allow_pickle": allow_pickle}
    folder_config: dict[str, Any] | None = {"_class_name": "DDPMScheduler"}
    vae_path = None if vae is None else Path(vae)
    guidance = None
    if path.is_dir() and (path / "model_index.json").is_file():
        files = read_pipeline(path)
        model = load_model(files.denoiser, **options)
        folder_config = files.scheduler_config
        if folder_config is not None and scheduler_config is None:
            check_scheduler_config(folder_config, path / "scheduler" / "scheduler_config.json")
        vae_path = files.vae if vae_path is None else vae_path
        guidance = recommended_guidance(files.model_index, path)
    else:
        model = load_model(path, **options)
    if scheduler_config is not None:
        folder_config = given_config
    decoder = None if vae_path is None else with_device_defaults(load_model(vae_path, **options), channels_last)
    return Pipeline(with_device_defaults(model, channels_last), folder_config, decoder, name=path.name,
                    guidance_scale=guidance)


def with_device_defaults(network: torch.nn.Module, channels_last: bool | None) -> torch.nn.Module:
    """`network` on the kernel backend measured fastest on its device (blitzdiff.models.default_backend), its 4-D
    weights channels-last or contiguous (channels_last; None: blitzdiff.models.default_channels_last), its
    self-attention projections (and a DiT's conditioning layers) packed for eager sampling
    (blitzdiff.models.pack_projections)."""
    device = next(network.parameters()).device
    set_channels_last(network, default_channels_last(device) if channels_last is None else channels_last)
    pack_projections(network)
    return set_backend(network, default_backend(device))


def recommended_guidance(model_index: dict[str, Any], folder: Path) -> float | None:
    """A pipeline folder's default guidance scale (model_index.json "_blitzdiff_guidance_scale"; diffusers ignores
    keys starting with "_"), or None."""
    value = model_index.get("_blitzdiff_guidance_scale")
    if value is None:
        return None
    try:
        return finite_number("_blitzdiff_guidance_scale", value)
    except ValueError as err:
        raise ValueError(f"{folder / 'model_index.json'}: {err}") from err
