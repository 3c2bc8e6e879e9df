"""Consistency distillation on the tiny DiT teacher of test_progressive: the consistency function against the engine's
own `lcm` sampler (a one-step LCM sample is f at the first timestep), the boundary condition f(z, 0) = z, a falling
loss, the EMA target, bitwise resume (EMA included) and the saved folder sampled with `lcm`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import blitzdiff
from blitzdiff.distill import Batch, ConsistencyTarget, Trainer, consistency
from blitzdiff.distill.consistency_distillation import student_scheduler_config
from blitzdiff.distill.trainer import CHECKPOINT_NAME

from .test_progressive import SCHEDULER, ddim_steps, digits, teacher


@pytest.mark.parametrize("prediction, original_steps", [("epsilon", 50), ("v_prediction", 20), ("sample", 50)])
def test_the_consistency_function_is_the_lcm_samplers_and_holds_the_boundary(prediction, original_steps):
    pipe = teacher(prediction)
    target = ConsistencyTarget(pipe, pipe.model, original_steps=original_steps)
    config = student_scheduler_config(pipe.scheduler_config, original_steps)
    assert config["prediction_type"] == prediction and config["original_inference_steps"] == original_steps
    student = blitzdiff.Pipeline(pipe.model, config)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    expected = student.sample(3, steps=1, sampler="lcm", noise=noise, class_labels=labels, guidance_scale=1.0,
                              output_type="raw", progress=False)  # one LCM step: f(noise, 999), no noise added
    with torch.no_grad():
        first = target.consistency(pipe.model, noise, torch.zeros(3, dtype=torch.int64), labels)
        assert int(target.grid[0]) == 999 and (first - expected).abs().max() < 1e-5 * expected.abs().max()
        assert len(target.grid) == original_steps + 1 and int(target.grid[-2]) == 1000 // original_steps - 1
        last = torch.full((3,), len(target.grid) - 1)
        assert int(target.grid[-1]) == 0
        assert torch.allclose(target.consistency(pipe.model, noise, last, labels), noise, atol=1e-6)  # f(z, 0) = z
        assert not torch.allclose(first, noise, atol=1e-2)


def test_loss_decreases_and_the_ema_follows(tmp_path):
    images, labels = digits(256)
    pipe = teacher()
    student = copy.deepcopy(pipe.model).requires_grad_(True)
    target = ConsistencyTarget(pipe, student, guidance=1.5, ema_decay=0.9)
    before = copy.deepcopy(target.ema.state_dict())
    trainer = Trainer(images, labels, batch=16, lr=1e-3, seed=0, folder=tmp_path, checkpoint_every=60, settings={},
                      progress=False)
    losses = trainer.run(student, target, round_index=0, iters=60)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    moved = [k for k, v in target.ema.state_dict().items() if not torch.equal(v, before[k])]
    assert moved  # the EMA target moved toward the student, and sits between it and where it started
    key = moved[0]
    start, ema, now = before[key], target.ema.state_dict()[key], student.state_dict()[key].detach()
    assert (ema - start).abs().sum() < (now - start).abs().sum()


def test_resume_is_bitwise_with_the_ema(tmp_path, monkeypatch):
    kwargs = {"iters": 4, "batch": 4, "lr": 1e-3, "guidance": 2.0, "checkpoint_every": 2, "progress": False}
    whole = consistency(teacher(), tmp_path / "whole", **kwargs)
    calls, real = [0], ConsistencyTarget.__call__

    def interrupted(self, student, batch):
        calls[0] += 1
        if calls[0] == 4:  # after the checkpoint at iteration 2
            raise KeyboardInterrupt
        return real(self, student, batch)

    monkeypatch.setattr(ConsistencyTarget, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        consistency(teacher(), tmp_path / "part", **kwargs)
    state = torch.load(tmp_path / "part" / CHECKPOINT_NAME, weights_only=True)
    assert state["iteration"] == 2 and state["target"] is not None  # the EMA network is checkpointed
    monkeypatch.setattr(ConsistencyTarget, "__call__", real)
    resumed = consistency(teacher(), tmp_path / "part", **kwargs, resume=True)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_student_samples_with_lcm_and_bad_input(tmp_path):
    folder = consistency(teacher(), tmp_path / "cd", iters=2, batch=4, lr=1e-3, guidance=2.0, progress=False)
    student = blitzdiff.load(folder)
    assert student.sampler_name == "lcm" and student.default_guidance_scale == 1.0
    for steps in (1, 2, 4):
        out = student.sample(2, steps=steps, seeds=0, class_labels=[1, 2], output_type="raw", progress=False)
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="original_steps=30: the teacher's DDIM timesteps and LCM's skipped ones "
                       "differ; original_steps must divide num_train_timesteps=1000"):
        consistency(teacher(), tmp_path / "v", iters=2, batch=4, lr=1e-3, original_steps=30, progress=False)
    with pytest.raises(ValueError, match="original_steps must be an int >= 1, got 0"):
        consistency(teacher(), tmp_path / "v", iters=2, batch=4, lr=1e-3, original_steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown loss 'l1'; allowed: l2, huber"):
        consistency(teacher(), tmp_path / "l1", iters=2, batch=4, lr=1e-3, loss="l1", progress=False)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        consistency(teacher(), tmp_path / "zero", iters=0, batch=4, lr=1e-3, progress=False)
    assert not (tmp_path / "v").exists() and not (tmp_path / "zero").exists()


@pytest.mark.parametrize("original_steps", [50, 20])
def test_the_loss_pairs_each_point_with_the_teachers_ddim_step_to_the_next(original_steps):
    # The loss assembled independently: the same draws, the teacher's step by the engine's N-step DDIM (stage j goes
    # from grid point j to j + 1), the EMA's f at the lower point, pseudo-Huber.
    pipe = teacher()
    student = copy.deepcopy(pipe.model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    target = ConsistencyTarget(pipe, pipe.model, guidance=2.0, original_steps=original_steps)  # EMA = the teacher
    images, labels = digits(6)
    got = target(student, Batch(images, labels, torch.Generator().manual_seed(5)))
    generator = torch.Generator().manual_seed(5)
    upper = torch.randint(0, original_steps, (6,), generator=generator)
    eps = torch.randn(images.shape, generator=generator)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = target.grid[upper]
    z = (alpha_bar[t].sqrt()[:, None, None, None] * images + (1 - alpha_bar[t]).sqrt()[:, None, None, None] * eps)
    z = z.float()
    config = {**SCHEDULER, "timestep_spacing": "trailing"}
    with torch.no_grad():
        landed = torch.cat([ddim_steps(pipe.model, config, original_steps, [int(j)], z[i:i + 1], labels[i:i + 1], 2.0)
                            for i, j in enumerate(upper)])
        wanted = target.consistency(pipe.model, landed, upper + 1, labels)
        mine = target.consistency(student, z, upper, labels)
    c = 1e-3
    expected = (((mine - wanted).flatten(1).square().sum(1) + c**2).sqrt() - c).mean()
    assert abs(got.item() - expected.item()) < 1e-4 * expected.item()


def test_after_step_is_an_exponential_moving_average():
    pipe = teacher()
    student = copy.deepcopy(pipe.model)
    target = ConsistencyTarget(pipe, student, ema_decay=0.95)
    with torch.no_grad():
        for p in target.ema.parameters():
            p.fill_(2.0)
        for p in student.parameters():
            p.fill_(4.0)
    target.after_step(student)
    assert all(torch.allclose(p, torch.full_like(p, 0.95 * 2.0 + 0.05 * 4.0)) for p in target.ema.parameters())
