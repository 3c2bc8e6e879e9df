"""`export.json`, the manifest beside an exported `model.onnx`: what the graph takes and returns, how it was made,
and the bytes it was written as, so that a runtime can refuse a graph that does not match what it expects."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FORMAT = "blitzdiff-onnx/1"
MANIFEST = "export.json"
GRAPH = "model.onnx"


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary sibling `.NAME.partial` to write into, renamed to out_dir (replacing it) when the block
    completes and removed when it raises: a failed export or build leaves nothing behind."""
    temporary = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if out_dir.exists():
            shutil.rmtree(out_dir)
        temporary.rename(out_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def weights_digest(module: Any) -> str:
    """sha256 over a module's state dict in sorted name order (name, dtype, shape and bytes of each tensor): whether
    an export folder holds these weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Record every file of the folder (the graph and its external data) with its size and digest, then write
    export.json."""
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest, "files": files}, indent=2) + "\n")


def read_format_json(path: Path, fmt: str, made_by: str) -> dict[str, Any]:
    """The JSON object at `path`, whose "format" must be `fmt`; ValueError when the file is missing (`made_by`: what
    writes it), not JSON, or of another format. Export manifests, engine records and sample-folder manifests."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name}; {made_by}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: format {found!r}; this blitzdiff reads {fmt!r}")
    return record


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export folder; ValueError when it is missing, malformed, of another format, or (verify)
    when a file it lists is missing or differs from what was written (a truncated or replaced graph)."""
    folder = Path(folder)
    manifest = read_format_json(folder / MANIFEST, FORMAT, f"an export folder holds {GRAPH} and {MANIFEST} "
                                "(blitzdiff export)")
    if verify:
        for name, expected in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise ValueError(f"{file}: listed in {MANIFEST} but missing")
            if file_digest(file) != expected:
                raise ValueError(f"{file} does not match {MANIFEST} ({expected['bytes']} bytes, sha256 "
                                 f"{expected['sha256'][:12]}...): truncated or replaced; export again")
    return manifest
