"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) in the discrete VP time of latent
consistency models (Luo et al. 2023, "Latent Consistency Models", Algorithm 1).

The student is a consistency function on LCMScheduler's skipped schedule (timesteps k - 1, 2k - 1, ..., T - 1 with
k = T // N, N the original steps (LCM's 50), and 0): f(z, t) = c_skip(t) z + c_out(t) x0(z, t), x0 from the
student's prediction in the teacher's parameterization (epsilon, v or x0; a v-prediction student is well conditioned
at one step, where an epsilon one divides by alpha_T ~ 0.006), with the boundary-condition scalings of the engine's
`lcm` plan (c_skip(0) = 1, c_out(0) = 0: f(z, 0) = z). Per example, for
a schedule point t_{n+1} and the next lower t_n: z = alpha x0 + sigma eps at t_{n+1}; the teacher's DDIM step
t_{n+1} -> t_n (a stage of the engine's N-step `ddim` plan over the same grid, guided by `guidance`) gives z_hat;
the loss is d(f_theta(z, t_{n+1}), f_ema(z_hat, t_n)), d = squared error or pseudo-Huber
sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023), the target network an exponential moving average of the student.
The student is saved with an LCMScheduler config over the teacher's betas and prediction type, so `lcm` samples it
at 1-8 steps.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..engine.config import SchedulerConfig, resolve
from ..engine.denoiser import preconditioning
from ..engine.inputs import positive_int
from ..engine.pipeline import Pipeline
from ..engine.solvers import build_plan
from ..engine.solvers.consistency import lcm_timesteps
from .progressive_distillation import ddim_config, rows_of, teacher_landing
from .trainer import Batch

ORIGINAL_STEPS = 50  # LCMScheduler's default original_inference_steps: the skipped schedule of the distillation
LOSSES = ("l2", "huber")


def lcm_config(teacher_config: dict[str, Any], original_steps: int = ORIGINAL_STEPS) -> SchedulerConfig:
    """The student's LCMScheduler over the teacher's training betas and prediction type (its own class's defaults
    filled in first: LCMScheduler's differ), on `original_steps` skipped timesteps, without clipping."""
    fields = resolve(None, teacher_config).fields
    betas = {k: fields[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                    "trained_betas", "prediction_type") if k in fields}
    return resolve("lcm", {"_class_name": "LCMScheduler", **betas}, original_inference_steps=original_steps,
                   clip_sample=False, thresholding=False)


def student_scheduler_config(teacher_config: dict[str, Any], original_steps: int = ORIGINAL_STEPS) -> dict[str, Any]:
    return {"_class_name": "LCMScheduler", **lcm_config(teacher_config, original_steps).fields}


class ConsistencyTarget:
    """The trainer's `(student, batch) -> loss` for consistency distillation of `teacher` (guided by `guidance`) on
    `original_steps` skipped timesteps, with its EMA target network (updated by after_step, saved in checkpoints
    through state_dict)."""

    def __init__(self, teacher: Pipeline, student: nn.Module, guidance: float = 1.0, *, ema_decay: float = 0.95,
                 loss: str = "huber", huber_c: float = 1e-3, original_steps: int = ORIGINAL_STEPS):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
        positive_int("original_steps", original_steps)
        self.teacher, self.guidance, self.loss, self.huber_c, self.decay = teacher, guidance, loss, huber_c, ema_decay
        self.ema = copy.deepcopy(student).requires_grad_(False).eval()
        self.steps = original_steps
        config = lcm_config(teacher.scheduler_config, original_steps)
        grid = [int(t) for t in lcm_timesteps(config, original_steps)] + [0]  # t_{N} > ... > t_1 > 0, descending
        self.teacher_plan = build_plan(ddim_config(teacher.scheduler_config), original_steps)
        if [round(s.timestep) for s in self.teacher_plan.stages] != grid[:-1]:
            total = config.fields["num_train_timesteps"]
            raise ValueError(f"original_steps={original_steps}: the teacher's DDIM timesteps and LCM's skipped ones "
                             f"differ; original_steps must divide num_train_timesteps={total}")
        # f(z, t) = a z + b net(z, t), from the engine's one-stage lcm plan at t (c_skip, c_out) and the prediction's
        # parameterization (epsilon: x0 = z / alpha - sigma / alpha eps; v: x0 = alpha z - sigma v)
        prediction = config.fields["prediction_type"]
        a, b, alpha, sigma = [], [], [], []
        for t in grid:
            (stage,) = build_plan(config, None, timesteps=[t]).stages
            x0 = preconditioning(prediction, stage)
            c_skip, c_out = stage.update.x, stage.update.denoised[0]
            a.append(c_skip + c_out * x0.c_skip)
            b.append(c_out * x0.c_out)
            alpha.append(stage.alpha)
            sigma.append(stage.sigma)
        self.grid = torch.tensor(grid)
        self.a, self.b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        self.alpha, self.sigma = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)

    def consistency(self, net: nn.Module, z: torch.Tensor, point: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """f(z, t) [B, ...] for z at schedule points `point` [B] (indices into the descending grid)."""
        cond = {} if labels is None else {"class_labels": labels}
        eps = net(z, self.grid[point].to(z.device), **cond)[:, : z.shape[1]]
        return rows_of(self.a, point, z) * z + rows_of(self.b, point, z) * eps

    def __call__(self, student: nn.Module, batch: Batch) -> torch.Tensor:
        x0, generator = batch.images, batch.generator
        upper = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)  # t_{n+1}; t_n = upper + 1
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        z = rows_of(self.alpha, upper, x0) * x0 + rows_of(self.sigma, upper, x0) * eps
        with torch.no_grad():
            landed = teacher_landing(self.teacher, self.teacher_plan, 1, z, upper, batch.labels, self.guidance)
            target = self.consistency(self.ema, landed, upper + 1, batch.labels)
        difference = (self.consistency(student, z, upper, batch.labels) - target).flatten(1)
        if self.loss == "l2":
            return difference.square().mean(1).mean()
        return ((difference.square().sum(1) + self.huber_c**2).sqrt() - self.huber_c).mean()

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * student, after each optimizer step."""
        for target, source in zip(self.ema.parameters(), student.parameters(), strict=True):
            target.lerp_(source.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)

