"""The output folder of a sharded sampling job: its manifest, its shards, per-rank progress files and the packed
`samples.npz`. Every file is written under a temporary name and renamed into place, so a file that exists is whole:
a shard that exists is complete, and a killed job leaves at most a `.partial` file, removed on the next start.

Layout of DIR:
    manifest.json            the recipe (everything that decides the samples' bits), the layout (n, shard size,
                             format), versions, the runs so far and a snapshot of the complete shards
    shard-00000.npz          format npz: arr_0 uint8 [m, H, W, C], arr_1 int64 labels [m] (class-conditional only),
                             indices int64 [m]; shard k holds samples k * shard_size ... (k + 1) * shard_size - 1
    images/000000.png        format png: one file per sample index, and shard-00000.json listing a complete shard's
    shard-00000.json           indices (written after its PNGs)
    .progress/rank-0.json    each rank's images done this run and a heartbeat time (rank 0 reads them for the bar)
    samples.npz              the pack: arr_0 uint8 [N, H, W, C] in index order (+ arr_1 labels), ADM's layout
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.pipeline import uint8_to_pil
from ..export.manifest import read_format_json

FORMAT = "blitzdiff-samples/1"
MANIFEST = "manifest.json"
PACKED = "samples.npz"
IMAGES = "images"
PROGRESS = ".progress"
PARTIAL = ".partial"
FORMATS = ("npz", "png")


def shard_count(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def shard_indices(shard: int, n: int, shard_size: int) -> range:
    """The sample indices of shard `shard`: consecutive, shard_size of them (fewer in the last shard)."""
    return range(shard * shard_size, min(n, (shard + 1) * shard_size))


def shard_path(folder: Path, shard: int, fmt: str) -> Path:
    """The file whose existence marks shard `shard` complete: the npz itself, or the PNG shard's index."""
    return folder / f"shard-{shard:05d}.{'npz' if fmt == 'npz' else 'json'}"


def png_path(folder: Path, index: int, n: int) -> Path:
    """DIR/images/000123.png: the sample index, zero-padded to at least 6 digits (more when n needs them)."""
    return folder / IMAGES / f"{index:0{max(6, len(str(n - 1)))}d}.png"


def write_atomic(path: Path, write: Any) -> None:
    """write(file object) into `path.partial`, flushed to disk, then renamed to `path`: readers see the whole file or
    none (a failed write removes its partial file; a killed one leaves it for remove_partials)."""
    temporary = path.with_name(path.name + PARTIAL)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def remove_partials(folder: Path) -> None:
    """Delete the `.partial` files a killed run left (shards, PNGs, the pack)."""
    for place in (folder, folder / IMAGES):
        for path in place.glob(f"*{PARTIAL}"):
            path.unlink()


def complete_shards(folder: Path, count: int, fmt: str) -> list[int]:
    return [k for k in range(count) if shard_path(folder, k, fmt).is_file()]


def write_shard(folder: Path, shard: int, fmt: str, n: int, indices: np.ndarray, images: np.ndarray,
                labels: np.ndarray | None) -> None:
    """One complete shard. images: uint8 [m, H, W, C]; labels: int64 [m] or None; indices: int64 [m]."""
    if fmt == "npz":
        arrays = {"arr_0": images, "indices": indices} | ({} if labels is None else {"arr_1": labels})
        write_atomic(shard_path(folder, shard, fmt), lambda f: np.savez(f, **arrays))
        return
    (folder / IMAGES).mkdir(exist_ok=True)
    for index, picture in zip(indices.tolist(), uint8_to_pil(images), strict=True):
        write_atomic(png_path(folder, index, n), lambda f, picture=picture: picture.save(f, format="PNG"))
    record = {"indices": [int(indices[0]), int(indices[-1]) + 1]}
    if labels is not None:
        record["labels"] = labels.tolist()
    write_json(shard_path(folder, shard, fmt), record)


def read_shard(folder: Path, shard: int, layout: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A complete shard's (uint8 images [m, H, W, C], labels [m] or None), checked against the layout; ValueError
    naming the file when it is unreadable or holds other samples."""
    fmt, n, shard_size = layout["format"], layout["n"], layout["shard_size"]
    expected = shard_indices(shard, n, shard_size)
    path = shard_path(folder, shard, fmt)
    try:
        if fmt == "npz":
            with np.load(path) as data:
                images, indices = data["arr_0"], data["indices"]
                labels = data["arr_1"] if "arr_1" in data else None
        else:
            from PIL import Image

            record = json.loads(path.read_text())
            indices = np.arange(*record["indices"])
            images = np.stack([np.asarray(Image.open(png_path(folder, i, n))) for i in indices.tolist()])
            images = images[..., None] if images.ndim == 3 else images
            labels = np.asarray(record["labels"], dtype=np.int64) if "labels" in record else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: unreadable shard ({error}); delete it and run the same command again to redo "
                         "it") from error
    if not np.array_equal(indices, np.arange(expected.start, expected.stop)) or images.dtype != np.uint8 \
            or images.ndim != 4 or len(images) != len(expected):
        raise ValueError(f"{path}: holds other samples than indices {expected.start}..{expected.stop - 1} as uint8 "
                         "[n, H, W, C]; delete it and run the same command again to redo it")
    return images, labels


def pack(folder: str | Path, out: str | Path | None = None) -> Path:
    """Assemble a complete folder's shards into one .npz in index order (default DIR/samples.npz): arr_0 uint8
    [N, H, W, C] and, for class-conditional samples, arr_1 int64 labels [N] — the layout ADM's and DiT's evaluation
    suites read. Streams one shard at a time into the zip (memory: one shard), written under a temporary name; equal
    samples give byte-identical files."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    layout = manifest["layout"]
    count = shard_count(layout["n"], layout["shard_size"])
    missing = sorted(set(range(count)) - set(complete_shards(folder, count, layout["format"])))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{folder}: {len(missing)} of {count} shards are not complete ({shown}); run the command "
                         "that made the folder again to finish them")
    out = folder / PACKED if out is None else Path(out)
    first, labels = read_shard(folder, 0, layout)
    shape = (layout["n"], *first.shape[1:])

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(_entry("arr_0.npy"), "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_1_0(entry, {"descr": "|u1", "fortran_order": False,
                                                             "shape": shape})
                all_labels = []
                for shard in range(count):
                    images, shard_labels = (first, labels) if shard == 0 else read_shard(folder, shard, layout)
                    if images.shape[1:] != shape[1:]:
                        raise ValueError(f"{shard_path(folder, shard, layout['format'])}: images of shape "
                                         f"{images.shape[1:]}, shard 0 has {shape[1:]}")
                    entry.write(np.ascontiguousarray(images).tobytes())
                    if shard_labels is not None:
                        all_labels.append(shard_labels)
            if all_labels:
                with archive.open(_entry("arr_1.npy"), "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.concatenate(all_labels).astype(np.int64))

    write_atomic(out, write)
    return out


def _entry(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed date, so that equal samples pack into byte-identical files (one checksum)."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def read_manifest(folder: Path) -> dict[str, Any]:
    return read_format_json(folder / MANIFEST, FORMAT, "a sample folder is written by blitzdiff sample --out-dir")


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field: NEW now, OLD in the folder' for each field of two recipes / layouts that differs."""
    return [f"{key}: {new.get(key)!r} now, {old.get(key)!r} in the folder" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def check_resumable(manifest: dict[str, Any], recipe: dict[str, Any], layout: dict[str, Any]) -> None:
    """Refuse to add samples made by another command to a folder: ValueError naming each differing field."""
    changed = differences(manifest.get("recipe", {}), recipe) + differences(manifest.get("layout", {}), layout)
    if changed:
        raise ValueError(f"the folder holds samples of another command ({'; '.join(changed)}); run the command that "
                         "made it to resume it, or give another --out-dir")


def read_progress(folder: Path, world_size: int) -> Iterator[dict[str, Any] | None]:
    """Each rank's last progress record (None before its first)."""
    for rank in range(world_size):
        try:
            yield json.loads((folder / PROGRESS / f"rank-{rank}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            yield None
