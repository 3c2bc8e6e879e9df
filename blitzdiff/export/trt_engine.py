"""TensorRT engines built from blitzdiff's ONNX exports: `build_engine` (one refittable engine, one optimization
profile per bucket batch with min = opt = max, precision flags, a timing cache kept between builds) and the engine
folder's record (`engine.json`: the export it came from, profiles, precision, TensorRT version, GPU, the plan's
digest). Running and refitting engines: blitzdiff.export.trt. Written against TensorRT 10.1+'s Python API; tensorrt
is imported only when a function needs it.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .manifest import GRAPH, file_digest, read_format_json, read_manifest, staged_folder

FORMAT = "blitzdiff-trt/1"
PLAN, RECORD, CACHE = "engine.plan", "engine.json", "timing.cache"
WHATS = ("denoiser", "vae")  # a "loop" export (integer-hash noise, unrolled steps) has not been tried on TensorRT
# Builder flags per precision; TF32 is on in a fresh builder config and cleared first, so "fp32" is full fp32.
PRECISIONS = {"fp32": (), "tf32": ("TF32",), "fp16": ("TF32", "FP16"), "bf16": ("TF32", "BF16")}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
INSTALL = 'pip install "blitzdiff[tensorrt]" (needs an NVIDIA GPU and NVIDIA\'s package index, pypi.nvidia.com)'


def require_tensorrt(package: str = "tensorrt") -> Any:
    """The tensorrt module (10.1 or newer; or polygraphy), or an ImportError saying how to install it."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ImportError(f"TensorRT engines need the {package} package, which is not installed: {INSTALL}") from None
    if package == "tensorrt" and tuple(int(part) for part in module.__version__.split(".")[:2]) < (10, 1):
        raise ImportError(f"tensorrt {module.__version__} is installed; blitzdiff needs 10.1 or newer: {INSTALL}")
    return module


def _check_build_options(manifest: dict[str, Any], export_dir: Path, buckets: Any, precision: Any,
                         workspace_gib: Any) -> tuple[int, ...]:
    if manifest["what"] not in WHATS:
        raise ValueError(f"{export_dir} is a {manifest['what']!r} export; TensorRT engines are built from "
                         f"{' or '.join(WHATS)} exports (blitzdiff export --what denoiser | vae)")
    symbols = sorted({dim for spec in manifest["inputs"] for dim in spec["shape"] if isinstance(dim, str)} - {"batch"})
    if symbols:
        raise ValueError(f"{export_dir} has a dynamic {' and '.join(symbols)}; engines are built for one size: export "
                         "without a size range")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if (not isinstance(buckets, Sequence) or isinstance(buckets, str) or not buckets
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets)):
        raise ValueError(f"buckets must be a non-empty sequence of ints >= 1, got {buckets!r}")
    low, high = manifest["batch"]
    outside = sorted({b for b in buckets if not low <= b <= high})
    if outside:
        raise ValueError(f"batch(es) {outside} outside the export's batch range {low}..{high}; export with a --batch "
                         "range covering them")
    if workspace_gib is not None and (isinstance(workspace_gib, bool) or not isinstance(workspace_gib, (int, float))
                                      or not workspace_gib > 0):
        raise ValueError(f"workspace_gib must be a number > 0 or None (TensorRT's default), got {workspace_gib!r}")
    return tuple(sorted(set(buckets)))


def build_engine(export_dir: str | Path, out_dir: str | Path, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 precision: str = "fp32", timing_cache: str | Path | None = None, workspace_gib: float | None = None,
                 overwrite: bool = False) -> Path:
    """Build `out_dir/engine.plan` and its record `out_dir/engine.json` from an export folder; returns out_dir.

    buckets: the batch sizes, one optimization profile each (inside the export's batch range). precision: "fp32"
    (TF32 off), "tf32", "fp16" or "bf16" (builder flags: TensorRT may keep layers in float32; inputs and outputs keep
    the export's dtypes). timing_cache: a file read before and written after the build (default out_dir/timing.cache),
    so repeated builds skip kernel timing. workspace_gib: TensorRT's workspace pool limit. The folder is written under
    a temporary name and renamed when complete; an existing out_dir is refused unless overwrite.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir)
    batches = _check_build_options(manifest, export_dir, buckets, precision, workspace_gib)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} exists; choose a new folder or pass overwrite=True (--overwrite)")
    for folder in (out_dir.parent, *([] if timing_cache is None else [Path(timing_cache).parent])):
        if not folder.is_dir():
            raise ValueError(f"folder {folder} does not exist")
    trt = require_tensorrt()
    cache_in = Path(timing_cache) if timing_cache is not None else out_dir / CACHE
    with staged_folder(out_dir) as temporary:
        start = time.perf_counter()
        plan, cache, io = _build(trt, export_dir, manifest, batches, precision, workspace_gib, cache_in)
        seconds = time.perf_counter() - start
        (temporary / PLAN).write_bytes(plan)
        replace_bytes(cache_in if timing_cache is not None else temporary / CACHE, cache)
        write_record(temporary, {
            "format": FORMAT, "export": export_entry(manifest), "profiles": list(batches), "precision": precision,
            "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "build_seconds": round(seconds, 3),
            "io": io})
    return out_dir


def _build(trt: Any, export_dir: Path, manifest: dict[str, Any], batches: tuple[int, ...], precision: str,
           workspace_gib: float | None, cache_path: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(serialized plan, serialized timing cache, the network's io: name, dtype, shape with -1 for the batch)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(export_dir / GRAPH)):  # from the path: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{export_dir / GRAPH}: TensorRT cannot parse it: {errors}")
    tensors = [*map(network.get_input, range(network.num_inputs)), *map(network.get_output, range(network.num_outputs))]
    io = [{"name": t.name, "dtype": str(torch_dtype(trt, t.dtype)).removeprefix("torch."), "shape": list(t.shape)}
          for t in tensors]
    if [t["name"] for t in io[: network.num_inputs]] != [spec["name"] for spec in manifest["inputs"]]:
        raise ValueError(f"{export_dir}: the graph's inputs differ from the manifest's {manifest['inputs']}")
    config = builder.create_builder_config()
    for batch in batches:  # profile i is batch batches[i]; fixed dims as exported
        profile = builder.create_optimization_profile()
        for spec in manifest["inputs"]:
            shape = [batch if dim == "batch" else dim for dim in spec["shape"]]
            profile.set_shape(spec["name"], shape, shape, shape)
        config.add_optimization_profile(profile)
    config.clear_flag(trt.BuilderFlag.TF32)
    for flag in (*PRECISIONS[precision], "REFIT"):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, False):  # another TensorRT's or GPU's: start afresh
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {export_dir} (its log above says why)")
    return plan, cache.serialize(), io


def replace_bytes(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """engine.json, with the size and sha256 of the plan beside it (a truncated or replaced plan is refused)."""
    record = {**record, "plan": file_digest(folder / PLAN)}
    replace_bytes(folder / RECORD, (json.dumps(record, indent=2) + "\n").encode())


def export_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """What an engine records of its export: the network's io, model (class, config, weights digest when the
    manifest has one) and the size and sha256 of every file (model.onnx and its external data)."""
    return {key: manifest[key] for key in ("what", "batch", "inputs", "outputs", "model", "files")}


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise ValueError(f"engine tensor type {dtype} is not supported here")
    return table[dtype]


def read_record(engine_dir: str | Path) -> dict[str, Any]:
    """engine.json of an engine folder; ValueError when missing or of another format."""
    return read_format_json(Path(engine_dir) / RECORD, FORMAT, f"an engine folder holds {PLAN} and {RECORD} "
                            "(build_engine)")


def record_difference(record: dict[str, Any], manifest: dict[str, Any], **more: tuple[Any, Any]) -> str | None:
    """The first of the network's fields (weights aside), then of `more` (name: (engine's, wanted)), that differs."""
    built = record["export"]
    pairs = {"kind": (built["what"], manifest["what"]), "inputs": (built["inputs"], manifest["inputs"]),
             "outputs": (built["outputs"], manifest["outputs"]),
             "model class": (built["model"]["class"], manifest["model"]["class"]),
             "model config": (built["model"]["config"], manifest["model"]["config"]), **more}
    return next((what for what, (engine_has, wanted) in pairs.items() if engine_has != wanted), None)


def check_same_network(record: dict[str, Any], manifest: dict[str, Any], export_dir: Path) -> None:
    if (what := record_difference(record, manifest)) is not None:
        raise ValueError(f"{export_dir} differs from the engine's export in its {what}, so its weights cannot be refit "
                         "into it; build a new engine (build_engine)")
