"""A sharded sampling job: N samples of one pipeline written to a folder as shards, split across the ranks of a
torchrun job, resumable, then packed into one samples.npz.

Sample i always has seed `seed + i` and class label `classes[i % len(classes)]` (default classes: 0 .. num_classes-1,
so the labels are balanced). Shard k (samples k * shard_size ...) is computed by exactly one process, in batches of
`batch` rows from its first index, so its bits depend only on the recipe (model, sampler, steps, guidance, dtype,
runtime mode, batch, CPU threads, device, versions), never on the world size or on which rank ran it. The recipe is
recorded in the folder's manifest and a re-run must match it: changing the batch, mode or thread count changes float
rounding (about 1e-6 on CPU), which a folder must not mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..engine.inputs import positive_int
from ..engine.pipeline import Pipeline, to_uint8
from ..export.manifest import weights_digest
from . import folder as files
from .world import JobRefused, World

POLL_S = 0.1  # how often a finished rank looks at the others' progress files
WATCH_S = 1.0  # at most this often a working rank reads them (after a batch): the bar, and the others' failures


class RankFailed(RuntimeError):
    """Another rank of the job reported an error or stopped making progress."""


class JobFailed(RuntimeError):
    """The job stopped; its complete shards are kept for a re-run of the same command."""


@dataclass
class JobSummary:
    """What a job did: n samples in the folder, images made by this run (complete shards are skipped), rank 0's
    wall time from the first batch to the last rank's end, and per rank its images and sampling seconds."""

    folder: Path
    n: int
    images: int
    skipped_shards: int
    wall_s: float
    ranks: list[dict[str, float]] = field(default_factory=list)
    packed: Path | None = None

    def __str__(self) -> str:
        if not self.images:
            return f"nothing to do: all {self.skipped_shards} shards were complete\n{self.n} samples in {self.folder}" \
                + (f" -> {self.packed}" if self.packed else "")
        rate = self.images / self.wall_s if self.wall_s > 0 else 0.0
        lines = [f"{self.images} images in {self.wall_s:.1f} s: {rate:.1f} images/s over {len(self.ranks)} "
                 f"rank{'s' if len(self.ranks) > 1 else ''}" + (f" ({self.skipped_shards} complete shards skipped)"
                                                                if self.skipped_shards else "")]
        if len(self.ranks) > 1:
            lines += [f"  rank {rank}: {r['images']} images in {r['seconds']:.1f} s, "
                      f"{r['images'] / r['seconds'] if r['seconds'] else 0:.1f} images/s"
                      for rank, r in enumerate(self.ranks)]
        lines.append(f"{self.n} samples in {self.folder}" + (f" -> {self.packed}" if self.packed else ""))
        return "\n".join(lines)


def recipe(pipe: Pipeline, *, steps: int, sampler: str | None, seed: int, classes: list[int] | None,
           guidance_scale: float, batch: int, mode: str | None) -> dict[str, Any]:
    """Everything that decides a sample's bits (see the module's doc)."""
    device = pipe.device
    kernels = sorted({m.backend for m in pipe.model.modules() if hasattr(m, "backend")})
    return {
        "model": pipe.name, "weights_sha256": weights_digest(pipe.model),
        "vae_sha256": None if pipe.vae is None else weights_digest(pipe.vae),
        "scheduler_config": json.loads(json.dumps(pipe.scheduler_config, default=str)),
        "sampler": sampler or pipe.sampler_name, "steps": steps, "guidance_scale": guidance_scale,
        "seeds": f"sample i: seed {seed} + i", "seed": seed,
        "labels": None if classes is None else "classes[i % len(classes)]", "classes": classes,
        "dtype": str(pipe.dtype).removeprefix("torch."), "latent_shape": list(pipe.latent_shape(None, None)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "mode": mode or "plain", "batch": batch, "kernels": kernels,
        "torch": torch.__version__, "blitzdiff": __version__,
    }


def check_arguments(pipe: Pipeline, n: int, steps: int, sampler: str | None, batch: int, shard_size: int, fmt: str,
                    classes: list[int] | None, timeout_s: float) -> None:
    for name, value in (("n", n), ("batch", batch), ("shard_size", shard_size)):
        positive_int(name, value)
    if fmt not in files.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(files.FORMATS)}")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s!r}")
    if pipe.kind.text_conditional:
        raise ValueError("sharded sampling takes unconditional and class-conditional models; a text-conditional "
                         "model needs prompts per sample, which it does not take")
    if classes is not None:
        if not pipe.kind.class_conditional:
            raise ValueError("classes given for a model without class conditioning")
        bad = [c for c in classes if not 0 <= c < pipe.num_classes]
        if not classes or bad:
            raise ValueError(f"classes must be labels in 0..{pipe.num_classes - 1}, got {classes}")
    pipe.evaluations(steps, sampler)  # an unknown sampler or an impossible step count fails here, before any file


def start_folder(out: Path, recipe_: dict[str, Any], layout: dict[str, Any], world_size: int) -> tuple[list[int], str]:
    """Rank 0: create the folder or check that it holds this command's samples; clear what a killed run left; record
    this run. Returns (the shards still to do, the run's id)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file")
    if out.is_dir() and not (out / files.MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"--out-dir {out} holds other files and no {files.MANIFEST}: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": files.FORMAT, "recipe": recipe_, "layout": layout, "runs": []}
    if (out / files.MANIFEST).is_file():
        manifest = files.read_manifest(out)
        files.check_resumable(manifest, recipe_, layout)
    files.remove_partials(out)
    (out / files.PROGRESS).mkdir(exist_ok=True)
    for stale in (out / files.PROGRESS).glob("rank-*.json"):
        stale.unlink()
    count = files.shard_count(layout["n"], layout["shard_size"])
    complete = files.complete_shards(out, count, layout["format"])
    run_id = secrets.token_hex(8)
    manifest["runs"].append({"id": run_id, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "world_size": world_size, "complete_at_start": len(complete)})
    manifest["versions"] = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__}
    manifest["shards"] = {"count": count, "complete": complete}
    files.write_json(out / files.MANIFEST, manifest)
    return sorted(set(range(count)) - set(complete)), run_id


def open_folder(world: World, out: Path, recipe_: dict[str, Any], layout: dict[str, Any]) -> tuple[list[int], str]:
    """Every rank: (the shards still to do, this run's id) as rank 0 found them (start_folder), once every rank sees
    the manifest rank 0 wrote; JobRefused on every rank otherwise."""
    start: tuple[str | None, list[int], str] = (None, [], "")
    if world.rank == 0:
        try:
            start = (None, *start_folder(out, recipe_, layout, world.size))
        except (ValueError, OSError) as failure:
            start = (str(failure), [], "")
    error, remaining, run_id = world.broadcast(start)
    if error:
        raise JobRefused(error)
    seen = None
    if world.rank != 0:
        with contextlib.suppress(ValueError, OSError, KeyError, IndexError):
            seen = files.read_manifest(out)["runs"][-1]["id"]
    world.agree(None if world.rank == 0 or seen == run_id else
                f"{out / files.MANIFEST} is not the one rank 0 just wrote: --out-dir must name one folder all ranks "
                "share (a shared filesystem across nodes)")
    return remaining, run_id


def update_manifest(out: Path, run_id: str, **run: Any) -> None:
    """Rank 0: refresh the snapshot of complete shards (the shard files are the truth) and this run's record."""
    manifest = files.read_manifest(out)
    count, fmt = manifest["shards"]["count"], manifest["layout"]["format"]
    manifest["shards"]["complete"] = files.complete_shards(out, count, fmt)
    for record in manifest["runs"]:
        if record["id"] == run_id:
            record.update(run)
    files.write_json(out / files.MANIFEST, manifest)


class Progress:
    """Rank 0's one bar over every rank's images (from their progress files), and the watch over the ranks: a rank
    that reports an error, or whose progress has not moved for timeout_s, fails the job."""

    def __init__(self, out: Path, world: World, run_id: str, total: int, timeout_s: float, show: bool):
        self.out, self.world, self.run_id, self.timeout_s = out, world, run_id, timeout_s
        self.seen = [(None, time.monotonic())] * world.size  # (last record, when it changed: this clock)
        self.last_poll = -math.inf
        self.bar = None
        if show and world.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"sampling ({world.size} rank{'s' if world.size > 1 else ''})",
                            unit="img", leave=True)

    def report(self, images: int, finished: bool = False, error: str | None = None) -> None:
        """Write this rank's record (a heartbeat); then, at most every WATCH_S, read everyone's: rank 0's bar moves,
        and a rank stops working as soon as another has failed."""
        record = {"run": self.run_id, "images": images, "finished": finished, "error": error}
        files.write_json(self.out / files.PROGRESS / f"rank-{self.world.rank}.json", record)
        if error is None and time.monotonic() - self.last_poll >= WATCH_S:
            self.poll()

    def poll(self) -> bool:
        """Read every rank's record; True when all have finished. Raises for a failed or silent rank."""
        now = self.last_poll = time.monotonic()
        records = []
        for rank, record in enumerate(files.read_progress(self.out, self.world.size)):
            record = record if record is not None and record.get("run") == self.run_id else None
            if record != self.seen[rank][0]:
                self.seen[rank] = (record, now)
            if record is not None and record["error"]:
                raise RankFailed(f"rank {rank} failed: {record['error']}")
            records.append(record)
        if self.bar is not None:
            self.bar.update(sum(r["images"] for r in records if r) - self.bar.n)
        if all(r is not None and r["finished"] for r in records):
            return True
        silent = [rank for rank, (record, since) in enumerate(self.seen)
                  if not (record and record["finished"]) and now - since > self.timeout_s]
        if silent:
            raise RankFailed(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} made no progress "
                               f"in {self.timeout_s:g} s (died or hung; --timeout sets the limit)")
        return False

    def wait(self) -> None:
        while not self.poll():
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sample_to_folder(pipe: Pipeline, out_dir: str | Path, n: int, *, steps: int, sampler: str | None = None,
                     seed: int = 0, classes: list[int] | None = None, guidance_scale: float | None = None,
                     batch: int = 64, shard_size: int = 1000, fmt: str = "npz", mode: str | None = None,
                     timeout_s: float = 600.0, pack: bool = True, progress: bool = True,
                     world: World | None = None) -> JobSummary:
    """Write samples 0 .. n-1 of `pipe` into out_dir as shards (see blitzdiff.batch_sampling.folder), this process
    doing its share of the world's (blitzdiff.batch_sampling.world.join; None: this process alone), then, on rank 0,
    pack them into out_dir/samples.npz. A folder that already holds some of this command's shards is resumed;
    one made by another command is refused, naming the difference. mode: compile the pipeline in this runtime mode
    with the one bucket `batch` (None: the plain eager loop). Returns the summary (complete on rank 0; other ranks
    get theirs without the pack)."""
    world = world or World()
    out = Path(out_dir)
    guidance = float(pipe.default_guidance_scale if guidance_scale is None else guidance_scale)
    if pipe.kind.class_conditional and classes is None:
        classes = list(range(pipe.num_classes))
    error = None
    try:
        check_arguments(pipe, n, steps, sampler, batch, shard_size, fmt, classes, timeout_s)
        recipe_ = recipe(pipe, steps=steps, sampler=sampler, seed=seed, classes=classes, guidance_scale=guidance,
                         batch=batch, mode=mode)
    except ValueError as failure:
        error = str(failure)
    world.agree(error)  # every rank has checked the same arguments: the same answer, or one rank's surprise
    layout = {"n": n, "shard_size": shard_size, "format": fmt}
    remaining, run_id = open_folder(world, out, recipe_, layout)

    total = sum(len(files.shard_indices(k, n, shard_size)) for k in remaining)
    watch = Progress(out, world, run_id, total, timeout_s, progress)
    started = time.monotonic()
    done = 0
    try:
        watch.report(0)
        if mode is not None:  # inside: a rank that fails to build tells the others
            pipe.compile(mode, buckets=(batch,))
        for shard in remaining[world.rank::world.size]:
            bounds = files.shard_indices(shard, n, shard_size)
            indices = np.arange(bounds.start, bounds.stop, dtype=np.int64)
            labels = None if classes is None else np.asarray([classes[i % len(classes)] for i in bounds], np.int64)
            images = []
            for begin in range(0, len(indices), batch):
                chunk = indices[begin:begin + batch]
                raw = pipe.sample(len(chunk), steps=steps, sampler=sampler, seeds=(seed + chunk).tolist(),
                                  class_labels=None if labels is None else labels[begin:begin + batch].tolist(),
                                  guidance_scale=guidance, output_type="raw", progress=False)
                images.append(to_uint8(pipe.output(raw, "numpy")))
                done += len(chunk)
                watch.report(done)
            files.write_shard(out, shard, fmt, n, indices, np.concatenate(images), labels)
            if world.rank == 0:
                update_manifest(out, run_id)
        seconds = time.monotonic() - started
        watch.report(done, finished=True)
        watch.wait()
    except Exception as failure:
        with contextlib.suppress(OSError):  # tell the other ranks, so that they stop waiting for this one
            watch.report(done, error=f"{type(failure).__name__}: {failure}")
        raise JobFailed(f"{failure}; the complete shards are kept: run the same command again to finish the "
                        "rest") from failure
    finally:
        watch.close()
    ranks = world.gather({"images": done, "seconds": seconds})
    wall = time.monotonic() - started
    summary = JobSummary(out, n, sum(r["images"] for r in ranks), files.shard_count(n, shard_size) - len(remaining),
                         wall, ranks)
    if world.rank == 0:
        update_manifest(out, run_id, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        wall_s=round(wall, 3), images=summary.images)
        if pack and (summary.images or not (out / files.PACKED).is_file()):  # an unchanged folder keeps its pack
            files.pack(out)
        summary.packed = out / files.PACKED if pack else None
    return summary

