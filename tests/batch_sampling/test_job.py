"""Sharded sampling in one process (blitzdiff.batch_sampling): the packed arrays against samples computed directly
with Pipeline.sample, ADM's evaluator layout, PNG shards, resume after a failure, refusal of a changed command, and
bad input refused before any file is written."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

import blitzdiff
from blitzdiff.batch_sampling import JobFailed, pack, sample_to_folder
from blitzdiff.batch_sampling import folder as files
from blitzdiff.batch_sampling import job as job_module
from blitzdiff.cli import main

from ..engine.test_runtime import SCHEDULER, tiny_model

STEPS, BATCH, SHARD = 2, 3, 4


@pytest.fixture(autouse=True)
def one_thread(torch_threads):
    torch.set_num_threads(1)  # put back by conftest's torch_threads


@pytest.fixture(scope="module")
def dit():
    return blitzdiff.load("dit-digits")


def job(pipe, out, n=10, **options):
    options = {"steps": STEPS, "batch": BATCH, "shard_size": SHARD, "progress": False, **options}
    return sample_to_folder(pipe, out, n, **options)


def expected(pipe, n, *, steps=STEPS, batch=BATCH, shard_size=SHARD, seed=0, classes=None, sampler=None):
    """Independent of the job: each shard's rows in the job's batches, straight through Pipeline.sample, rounded to
    uint8 as a PNG writer would; labels cycling through `classes`."""
    conditional = pipe.kind.class_conditional
    cycle = (classes or list(range(pipe.num_classes))) if conditional else None
    images = []
    for start in range(0, n, shard_size):
        shard = list(range(start, min(n, start + shard_size)))
        for begin in range(0, len(shard), batch):
            rows = shard[begin:begin + batch]
            array = pipe.sample(len(rows), steps=steps, sampler=sampler, seeds=[seed + i for i in rows],
                                class_labels=[cycle[i % len(cycle)] for i in rows] if conditional else None,
                                output_type="numpy", progress=False)
            images.append(np.rint(array * 255).astype(np.uint8))
    labels = np.array([cycle[i % len(cycle)] for i in range(n)]) if conditional else None
    return np.concatenate(images), labels


def packed(path):
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def test_packed_samples_are_the_pipelines_in_index_order_in_adm_layout(dit, tmp_path):
    summary = job(dit, tmp_path / "run", n=10, seed=5)
    arrays = packed(tmp_path / "run" / "samples.npz")
    images, labels = expected(dit, 10, seed=5)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (10, 16, 16, 1)  # [N, H, W, C]
    assert np.array_equal(arrays["arr_0"], images)
    assert arrays["arr_1"].dtype == np.int64 and np.array_equal(arrays["arr_1"], labels)
    assert (summary.images, summary.skipped_shards, summary.packed) == (10, 0, tmp_path / "run" / "samples.npz")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["shards"] == {"count": 3, "complete": [0, 1, 2]}
    assert manifest["layout"] == {"n": 10, "shard_size": SHARD, "format": "npz"}
    recipe = manifest["recipe"]
    assert (recipe["model"], recipe["sampler"], recipe["steps"], recipe["guidance_scale"], recipe["seed"],
            recipe["batch"], recipe["threads"], recipe["mode"]) == ("dit-digits", "ddpm", STEPS, 1.25, 5, BATCH, 1,
                                                                     "plain")
    assert manifest["runs"][0]["images"] == 10


def test_unconditional_model_packs_no_labels_and_other_sampler(tmp_path):
    unet = blitzdiff.load("unet-digits")
    job(unet, tmp_path / "run", n=5, sampler="dpmpp_2m", shard_size=2, batch=2)
    arrays = packed(tmp_path / "run" / "samples.npz")
    assert sorted(arrays) == ["arr_0"]
    assert np.array_equal(arrays["arr_0"], expected(unet, 5, sampler="dpmpp_2m", shard_size=2, batch=2)[0])


def test_classes_cycle_and_png_format_packs_the_same(dit, tmp_path):
    job(dit, tmp_path / "npz", n=7, classes=[3, 8])
    job(dit, tmp_path / "png", n=7, classes=[3, 8], fmt="png")
    pngs = sorted(p.name for p in (tmp_path / "png" / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    a, b = packed(tmp_path / "npz" / "samples.npz"), packed(tmp_path / "png" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_1"].tolist() == [3, 8, 3, 8, 3, 8, 3]
    assert np.array_equal(a["arr_0"], expected(dit, 7, classes=[3, 8])[0])


def test_batch_and_mode_change_rounding_only(dit, tmp_path):
    """Within one recipe the bits are fixed; another batch or runtime mode is another recipe, equal to float
    tolerance (at most one uint8 level)."""
    job(dit, tmp_path / "a", n=8)
    job(blitzdiff.load("dit-digits"), tmp_path / "b", n=8, batch=8, mode="eager")
    a, b = packed(tmp_path / "a" / "samples.npz"), packed(tmp_path / "b" / "samples.npz")
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_failed_run_resumes_to_the_uninterrupted_result(dit, tmp_path, monkeypatch):
    job(dit, tmp_path / "whole", n=10)
    write = files.write_shard
    written = []

    def fail_after_two(folder, shard, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a killed run: the third shard's batches were computed, never written
        written.append(shard)
        write(folder, shard, *args)

    monkeypatch.setattr(files, "write_shard", fail_after_two)
    with pytest.raises(KeyboardInterrupt):
        job(dit, tmp_path / "run", n=10)
    monkeypatch.setattr(files, "write_shard", write)
    assert sorted(p.name for p in (tmp_path / "run").glob("shard-*")) == ["shard-00000.npz", "shard-00001.npz"]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard-*")}
    (tmp_path / "run" / "shard-00002.npz.partial").write_bytes(b"half a shard")  # what a kill mid-write leaves
    calls = []
    sample = dit.sample
    monkeypatch.setattr(dit, "sample", lambda n, **kw: calls.append(n) or sample(n, **kw))
    summary = job(dit, tmp_path / "run", n=10)
    assert (summary.images, summary.skipped_shards, calls) == (2, 2, [2])  # only the last shard (2 samples)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("shard-0000[01].npz")} == before
    assert not list((tmp_path / "run").glob("*.partial"))
    assert (tmp_path / "run" / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()
    assert [r["complete_at_start"] for r in json.loads((tmp_path / "run" / "manifest.json").read_text())["runs"]] \
        == [0, 2]
    again = job(dit, tmp_path / "run", n=10)
    assert (again.images, calls) == (0, [2])
    assert str(again) == f"nothing to do: all 3 shards were complete\n10 samples in {tmp_path / 'run'} -> " \
        f"{tmp_path / 'run' / 'samples.npz'}"


def test_an_error_in_a_run_keeps_the_complete_shards(dit, tmp_path, monkeypatch):
    sample = dit.sample
    calls = []

    def nan_on_third(n, **kw):
        calls.append(n)
        if len(calls) == 3:
            raise blitzdiff.engine.network.NonFiniteOutput("the network returned NaN")
        return sample(n, **kw)

    monkeypatch.setattr(dit, "sample", nan_on_third)
    with pytest.raises(JobFailed, match="returned NaN; the complete shards are kept: run the same command again"):
        job(dit, tmp_path / "run", n=10)
    assert [p.name for p in (tmp_path / "run").glob("shard-*")] == ["shard-00000.npz"]


@pytest.mark.parametrize("change, field", [
    ({"steps": 3}, "steps: 3 now, 2 in the folder"),
    ({"sampler": "ddim"}, "sampler: 'ddim' now, 'ddpm' in the folder"),
    ({"guidance_scale": 2.0}, "guidance_scale"),
    ({"seed": 1}, "seed: 1 now, 0 in the folder"),
    ({"batch": 4}, "batch: 4 now, 3 in the folder"),
    ({"mode": "eager"}, "mode: 'eager' now, 'plain' in the folder"),
    ({"classes": [1]}, "classes"),
    ({"n": 11}, "n: 11 now, 10 in the folder"),
    ({"shard_size": 5}, "shard_size: 5 now, 4 in the folder"),
    ({"fmt": "png"}, "format: 'png' now, 'npz' in the folder"),
])
def test_a_changed_command_is_refused_naming_the_difference(dit, tmp_path, change, field):
    job(dit, tmp_path / "run", n=10, pack=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="the folder holds samples of another command") as error:
        job(blitzdiff.load("dit-digits"), tmp_path / "run", **{"n": 10, **change})
    assert field in str(error.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_other_weights_or_threads_are_another_recipe(dit, tmp_path):
    job(dit, tmp_path / "run", n=4, pack=False)
    other = blitzdiff.load("dit-digits")
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="weights_sha256"):
        job(other, tmp_path / "run", n=4)
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="threads: 2 now, 1 in the folder"):
        job(dit, tmp_path / "run", n=4)


@pytest.mark.parametrize("options, message", [
    ({"n": 0}, "n must be an int >= 1, got 0"),
    ({"batch": 0}, "batch must be an int >= 1"),
    ({"shard_size": 2.5}, "shard_size must be an int >= 1"),
    ({"fmt": "jpeg"}, "unknown format 'jpeg'; allowed: npz, png"),
    ({"sampler": "nope"}, "nope"),
    ({"steps": 0}, "steps"),
    ({"classes": [10]}, r"classes must be labels in 0\.\.9, got \[10\]"),
    ({"classes": []}, "classes must be labels"),
    ({"timeout_s": 0}, "timeout must be > 0"),
])
def test_bad_arguments_are_refused_before_any_file(dit, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        job(dit, tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_models_it_cannot_sample_are_refused(tmp_path):
    from blitzdiff.models.unet_2d_condition import UNet2DConditionModel

    text = UNet2DConditionModel(dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4))
    with pytest.raises(ValueError, match="text-conditional model needs prompts"):
        job(blitzdiff.Pipeline(text, {"_class_name": "DDIMScheduler"}), tmp_path / "run")
    with pytest.raises(ValueError, match="classes given for a model without class conditioning"):
        job(blitzdiff.load("unet-digits"), tmp_path / "run", classes=[1])
    assert not (tmp_path / "run").exists()


def test_folders_that_are_not_sample_folders_are_refused(dit, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        job(dit, tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files and no manifest.json"):
        job(dit, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_pack_refuses_missing_and_damaged_shards(dit, tmp_path):
    job(dit, tmp_path / "run", n=10, pack=False)
    assert not (tmp_path / "run" / "samples.npz").exists()
    (tmp_path / "run" / "shard-00001.npz").unlink()
    with pytest.raises(ValueError, match=r"1 of 3 shards are not complete \(1\); run the command"):
        pack(tmp_path / "run")
    job(dit, tmp_path / "run", n=10, pack=False)  # redoes shard 1 only
    path = tmp_path / "run" / "shard-00002.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00002.npz: unreadable shard"):
        pack(tmp_path / "run")
    assert not (tmp_path / "run" / "samples.npz").exists() and not list((tmp_path / "run").glob("*.partial"))
    with pytest.raises(ValueError, match="no manifest.json"):
        pack(tmp_path)


def test_pack_streams_a_zip64_npz_numpy_reads(tmp_path):
    """The pack is written entry by entry (one shard in memory); numpy reads it like np.savez's."""
    pipe = blitzdiff.Pipeline(tiny_model(), SCHEDULER, name="tiny", guidance_scale=1.0)
    job(pipe, tmp_path / "run", n=9, shard_size=2, batch=2)
    arrays = packed(tmp_path / "run" / "samples.npz")
    shards = [np.load(tmp_path / "run" / f"shard-{k:05d}.npz") for k in range(5)]
    assert np.array_equal(arrays["arr_0"], np.concatenate([s["arr_0"] for s in shards]))
    assert np.array_equal(arrays["arr_1"], np.arange(9) % 5)


def test_command_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["sample", "-n", "3", "--batch", "2"]) == 2
    assert "--batch only go with --out-dir (sharded output)" in capsys.readouterr().err
    assert main(["sample", "--out-dir", out, "--output", "grid.png"]) == 2
    assert "--output writes a grid, --out-dir a sample folder: give one" in capsys.readouterr().err
    assert main(["sample", "--out-dir", out, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["pack", out]) == 2
    assert f"blitzdiff pack: error: {out}: no manifest.json" in capsys.readouterr().err
    assert main(["sample", "-n", "3", "--steps", "2", "--out-dir", out, "--no-pack", "--no-progress"]) == 0
    assert "3 images in" in capsys.readouterr().out and not (tmp_path / "run" / "samples.npz").exists()
    assert torch.get_num_threads() == 1  # --threads' default
    assert main(["pack", out]) == 0
    assert capsys.readouterr().out == f"-> {tmp_path / 'run' / 'samples.npz'}\n"
    assert packed(tmp_path / "run" / "samples.npz")["arr_0"].shape == (3, 16, 16, 1)


def test_a_working_rank_stops_when_another_reports_an_error(tmp_path, monkeypatch):
    """The watch without processes: rank 1 of 2 reads rank 0's record at its next batch (at most every WATCH_S) and
    stops; a rank whose record does not move for the timeout is named."""
    from blitzdiff.batch_sampling.job import RankFailed
    from blitzdiff.batch_sampling.world import World

    (tmp_path / files.PROGRESS).mkdir()
    rank0 = job_module.Progress(tmp_path, World(0, 2), "run-a", 10, 60.0, show=False)
    rank1 = job_module.Progress(tmp_path, World(1, 2), "run-a", 10, 60.0, show=False)
    rank0.report(0)
    rank1.report(3)
    rank0.report(0, error="NonFiniteOutput: NaN")
    monkeypatch.setattr(job_module, "WATCH_S", 0.0)
    with pytest.raises(RankFailed, match="rank 0 failed: NonFiniteOutput: NaN"):
        rank1.report(6)
    quiet = job_module.Progress(tmp_path, World(1, 2), "run-b", 10, 0.05, show=False)  # rank 0 never writes run-b
    quiet.report(1)
    time.sleep(0.1)
    with pytest.raises(RankFailed, match="rank 0 made no progress in 0.05 s"):
        quiet.report(2)
