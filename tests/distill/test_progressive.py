"""Progressive distillation on a tiny random-weight DiT teacher (8x8, one channel, 10 classes + the null class).

The algebra test fits one batch and checks the student's one DDIM step against the teacher's two, both run by the
engine's own sampler loop (PlanRun over `build_plan(resolve("ddim", ...))`), not by the code under test.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import blitzdiff
from blitzdiff.distill import Batch, ProgressiveTarget, Trainer, load_images, progressive
from blitzdiff.distill.progressive_distillation import DISTILLED_STEPS_FIELD
from blitzdiff.distill.run import save_student
from blitzdiff.distill.trainer import CHECKPOINT_NAME
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.network import NetworkCall
from blitzdiff.engine.sampler import PlanRun
from blitzdiff.engine.solvers import build_plan
from blitzdiff.models.presets import build_random

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "clip_sample": False, "timestep_spacing": "trailing"}
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 1, "out_channels": 1, "num_layers": 2,
       "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}
NULL = 10
STEPS = 4  # the student's step count in the algebra test (its teacher: 8)
POINTS = 3  # the seed of its training points (4 images, one at each student step)


def teacher(prediction_type: str = "epsilon", scheduler: dict | None = None) -> blitzdiff.Pipeline:
    config = {**SCHEDULER, "prediction_type": prediction_type} if scheduler is None else scheduler
    return blitzdiff.Pipeline(build_random("DiTTransformer2DModel", DIT, seed=1), config, name="tiny-dit")


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_images(None, channels=1, size=8, class_conditional=True)
    return images[:n], labels[:n]


def ddim_steps(pipe_model, config: dict, steps: int, stages: list[int], z: torch.Tensor, labels: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """The engine's DDIM at `steps` steps run from state z through `stages` (the reference; independent of distill)."""
    sampler_config = blitzdiff.resolve("ddim", config)
    plan = build_plan(sampler_config, steps)
    uncond = {"class_labels": torch.full_like(labels, NULL)} if guidance != 1.0 else None
    denoiser = Denoiser(NetworkCall(pipe_model, 1), plan, sampler_config.prediction_type, batch=len(z),
                        device=z.device, cond={"class_labels": labels}, uncond=uncond, guidance_scale=guidance)
    run = PlanRun(plan, denoiser, z, torch.zeros(len(z), dtype=torch.int64))
    for k in stages:
        run.stage(k)
    return run.x


def test_loss_decreases_on_a_tiny_teacher(tmp_path):
    images, labels = digits(256)
    target = ProgressiveTarget(teacher("v_prediction"), steps=2, teacher_steps=2)
    student = copy.deepcopy(target.teacher.model).requires_grad_(True)
    trainer = Trainer(images, labels, batch=16, lr=2e-3, seed=0, folder=tmp_path, checkpoint_every=60, settings={},
                      progress=False)
    losses = trainer.run(student, target, round_index=1, iters=60)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses  # measured: 0.155 -> 0.059


@torch.no_grad()
def _algebra_error(student, pipe, target, x0, labels, guidance):
    """The largest relative L2 error |student's one DDIM step - teacher's two DDIM steps| / |teacher's two steps|
    over the training points."""
    z, step = target.noisy(x0, torch.Generator().manual_seed(POINTS))
    student_config = {**SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    worst = 0.0
    for i in step.unique().tolist():
        rows = step == i
        teacher_two = ddim_steps(pipe.model, pipe.scheduler_config, 2 * STEPS, [2 * i, 2 * i + 1], z[rows],
                                 labels[rows], guidance)
        student_one = ddim_steps(student, student_config, STEPS, [i], z[rows], labels[rows], 1.0)
        error = (student_one - teacher_two).flatten(1).norm(dim=1) / teacher_two.flatten(1).norm(dim=1)
        worst = max(worst, error.max().item())
    return worst


def test_student_step_equals_two_teacher_steps_on_fitted_points():
    """After fitting one batch, the student's DDIM step (of 4) lands where the guided teacher's two DDIM steps (of 8)
    land, at every student step; before fitting (the teacher's own single step) it does not."""
    torch.manual_seed(0)
    pipe = teacher("v_prediction")
    x0, labels = digits(4)
    guidance = 1.5
    target = ProgressiveTarget(pipe, steps=STEPS, teacher_steps=2, guidance=guidance)
    student = copy.deepcopy(pipe.model).requires_grad_(True)
    assert set(target.noisy(x0, torch.Generator().manual_seed(POINTS))[1].tolist()) == set(range(STEPS))  # all checked
    before = _algebra_error(student, pipe, target, x0, labels, guidance)
    optimizer = torch.optim.AdamW(student.parameters(), lr=6e-3, weight_decay=0.0)
    for _ in range(300):
        loss = target(student, Batch(x0, labels, torch.Generator().manual_seed(POINTS)))  # the same points each time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _algebra_error(student, pipe, target, x0, labels, guidance)
    assert after < 0.01, (after, before)
    assert before > 10 * after, (after, before)


def test_resume_is_bitwise_and_interruption_keeps_checkpoints(tmp_path, monkeypatch):
    kwargs = {"steps_from": 2, "steps_to": 1, "iters_per_round": 4, "batch": 4, "lr": 1e-3, "guidance": 2.0,
              "checkpoint_every": 2, "progress": False}
    whole = progressive(teacher(), tmp_path / "whole", **kwargs)

    calls, real = [0], ProgressiveTarget.__call__

    def interrupted(self, student, batch):
        calls[0] += 1
        if calls[0] == 8:  # round 1 (the halving round), its 4th iteration: after the checkpoint at iteration 2
            raise KeyboardInterrupt
        return real(self, student, batch)

    monkeypatch.setattr(ProgressiveTarget, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        progressive(teacher(), tmp_path / "part", **kwargs)
    state = torch.load(tmp_path / "part" / CHECKPOINT_NAME, weights_only=True)
    assert (state["round"], state["iteration"]) == (1, 2)
    assert not (tmp_path / "part" / "model_index.json").exists()
    monkeypatch.setattr(ProgressiveTarget, "__call__", real)
    with pytest.raises(ValueError, match="resume=True"):
        progressive(teacher(), tmp_path / "part", **kwargs)
    with pytest.raises(ValueError, match="other settings"):
        progressive(teacher(), tmp_path / "part", **{**kwargs, "lr": 2e-3}, resume=True)
    resumed = progressive(teacher(), tmp_path / "part", **kwargs, resume=True)

    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in teacher().model.state_dict().items())  # it did train


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A run killed while writing a checkpoint keeps the previous one whole, and resumes from it bit-for-bit."""
    kwargs = {"steps_from": 2, "steps_to": 1, "iters_per_round": 4, "batch": 4, "lr": 1e-3, "checkpoint_every": 2,
              "progress": False}
    whole = progressive(teacher(), tmp_path / "whole", **kwargs)
    calls, real_save = [0], torch.save

    def killed_while_writing(state, path):
        calls[0] += 1
        if calls[0] == 3:  # the checkpoint after round 1's 2nd iteration: half written, then the process dies
            with open(path, "wb") as file:
                file.write(b"partial")
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        progressive(teacher(), tmp_path / "part", **kwargs)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(tmp_path / "part" / CHECKPOINT_NAME, weights_only=True)
    assert (state["round"], state["iteration"]) == (0, 4)
    resumed = progressive(teacher(), tmp_path / "part", **kwargs, resume=True)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / weights), load_file(resumed / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_student_loads_and_samples_with_ddim(tmp_path):
    out = progressive(teacher(), tmp_path / "student", steps_from=4, steps_to=2, iters_per_round=2, batch=4, lr=1e-3,
                      checkpoint_every=2, progress=False)
    pipe = blitzdiff.load(out)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["prediction_type"], config["timestep_spacing"]) == (
        "DDIMScheduler", "v_prediction", "trailing")
    assert config[DISTILLED_STEPS_FIELD] == 2 and pipe.sampler_name == "ddim"
    assert pipe.default_guidance_scale == 1.0  # the guidance (if any) is in the weights
    final = torch.load(out / CHECKPOINT_NAME, weights_only=True)["student"]
    assert all(torch.equal(final[k], v) for k, v in pipe.model.state_dict().items())
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    got = pipe.sample(3, steps=2, noise=noise, class_labels=labels, output_type="raw", progress=False)
    with torch.no_grad():  # as pipe.sample: with gradients recorded, the "auto" model would run its specs instead
        reference = blitzdiff.sample(lambda x, t, class_labels: pipe.model(x, t, class_labels=class_labels), noise,
                                     steps=2, sampler="ddim", cond={"class_labels": labels},
                                     scheduler_config={**SCHEDULER, "prediction_type": "v_prediction"})
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    # a student of this student (its folder as the teacher) records the whole lineage
    again = progressive(out, tmp_path / "again", steps_to=1, iters_per_round=1, batch=4, lr=1e-3, progress=False)
    record = json.loads((again / "model_index.json").read_text())["_blitzdiff_distillation"]
    assert (record["teacher"], record["steps"]) == ("student", 1)
    assert record["teacher_distillation"] == {"method": "progressive", "teacher": "tiny-dit", "steps": 2,
                                              "guidance": 1.0}


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher": {"_class_name": "CMStochasticIterativeScheduler"}}, "discrete VP schedule"),
    ({"teacher": {**SCHEDULER, "prediction_type": "flow"}}, "prediction_type='flow'"),
    ({"steps_from": 64, "steps_to": 3}, "does not halve"),
    ({"steps_from": 2, "steps_to": 4}, "does not halve"),
    ({"iters_per_round": 0}, "iters_per_round must be an int >= 1"),
    ({"batch": 0}, "batch must be an int >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"data": "no/such/file.npz"}, "does not exist"),
])
def test_bad_input_is_refused_before_training(tmp_path, change, message):
    kwargs = {"steps_from": 2, "steps_to": 1, "iters_per_round": 2, "batch": 2, "lr": 1e-3, "progress": False}
    scheduler = change.pop("teacher", None)
    with pytest.raises(ValueError, match=message):
        progressive(teacher(scheduler=scheduler), tmp_path, **{**kwargs, **change})
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_load_images_sources(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)  # ADM layout [N, H, W, C]
    np.savez(tmp_path / "adm.npz", arr_0=rgb, arr_1=np.arange(5))
    images, labels = load_images(tmp_path / "adm.npz", channels=3, size=12, class_conditional=True)
    torch.testing.assert_close(images, torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    gray, _ = load_images(tmp_path / "adm.npz", channels=1, size=12, class_conditional=False)
    expected = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 127.5 - 1
    torch.testing.assert_close(gray[:, 0], torch.from_numpy(expected), rtol=0, atol=1e-5)
    small, _ = load_images(tmp_path / "adm.npz", channels=3, size=6, class_conditional=False)
    assert small.shape == (5, 3, 6, 6) and small.min() >= -1 and small.max() <= 1

    for i, label in enumerate((3, 7)):
        (tmp_path / "pngs" / str(label)).mkdir(parents=True)
        Image.fromarray(rgb[i], "RGB").save(tmp_path / "pngs" / str(label) / "a.png")
    images, labels = load_images(tmp_path / "pngs", channels=3, size=12, class_conditional=True)
    assert labels.tolist() == [3, 7]
    torch.testing.assert_close(images[1], torch.from_numpy(rgb[1]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="folder named"):
        Image.fromarray(rgb[2], "RGB").save(tmp_path / "pngs" / "loose.png")
        load_images(tmp_path / "pngs", channels=3, size=12, class_conditional=True)

    np.save(tmp_path / "two.npy", np.zeros((2, 8, 8, 2), np.uint8))
    (tmp_path / "empty").mkdir()
    for path, kwargs, message in [
        (tmp_path / "missing.npz", {}, "does not exist"),
        (tmp_path / "two.npy", {}, "2 channels"),
        (tmp_path / "empty", {}, "no .png files"),
        (tmp_path / "two.npy", {"class_conditional": True}, "no labels"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_images(path, **{"channels": 1, "size": 8, "class_conditional": False, **kwargs})


def test_a_channels_last_unet_student_saves_dense_weights(tmp_path):
    """blitzdiff.load stores a UNet's convolution weights channels-last on the CPU, and a student copies its
    teacher's: safetensors takes dense tensors only, so the saved weights are contiguous copies, values unchanged."""
    unet = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16),
            "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ("DownBlock2D",) * 2,
            "up_block_types": ("UpBlock2D",) * 2}
    student = build_random("UNet2DModel", unet, seed=2).to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in student.parameters())
    pipe = blitzdiff.Pipeline(student, SCHEDULER, name="tiny-unet")
    folder = save_student(tmp_path / "student", student, pipe, pipe, {"_class_name": "DDIMScheduler"}, {})
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == student.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())
