"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
arXiv:2202.00512, Algorithm 2) in the teacher's discrete VP schedule.

A round trains a student at N DDIM steps ("trailing" timesteps) to do in one step what its teacher does in two: for
a student step i at timestep t going to t'', z_t = alpha_t x0 + sigma_t eps, the teacher takes the engine's two DDIM
steps t -> t' -> t'' (stages 2i and 2i + 1 of its 2N-step plan, run by the sampler loop), and the student's x0
target is the x0 whose one DDIM step lands on the same point (Algorithm 2's x~):

    x0~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

with the coefficients read from the student's own DDIM plan (at t'' = 0: x0~ = z_t'', the teacher's x0). The student
predicts v (x0_hat = alpha z - sigma v, the parameterization the paper found to work down to one step) and the loss is
the truncated-SNR weighted x0 error max(SNR_t, 1) * |x0_hat - x0~|^2. Embedded teachers predict epsilon, so round 0
turns the teacher into a v-prediction student at its own step count N0 (the same target with one teacher step: the
teacher's x0 estimate); each later round halves N with the previous student as teacher. Guidance, when given, is
applied by the original teacher's denoiser, so the student learns the guided teacher in one network call.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..engine.config import CLASS_DEFAULTS, SchedulerConfig, resolve
from ..engine.denoiser import Denoiser, preconditioning
from ..engine.functional import parameterization, postprocessing
from ..engine.inputs import positive_int
from ..engine.network import NetworkCall
from ..engine.pipeline import Pipeline
from ..engine.plan import Plan
from ..engine.sampler import run_plan
from ..engine.solvers import build_plan
from .trainer import Batch

DISTILLED_STEPS_FIELD = "_blitzdiff_distilled_steps"  # scheduler_config.json: the step count the student learned
DEFAULT_STEPS_FROM = 64
TEACHER_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def ddim_config(scheduler_config: dict[str, Any], **overrides: Any) -> SchedulerConfig:
    """The teacher's schedule as the DDIM sampler with "trailing" timesteps (every student grid point on it)."""
    return resolve("ddim", scheduler_config, timestep_spacing="trailing", **overrides)


def student_scheduler_config(teacher_config: dict[str, Any], steps: int) -> dict[str, Any]:
    """The student's scheduler_config.json: DDIM over the teacher's betas, v-prediction, trailing, no clipping (its
    x0 is learned to land where the teacher lands), and the distilled step count."""
    config = ddim_config(teacher_config, prediction_type="v_prediction", clip_sample=False, thresholding=False)
    return {"_class_name": "DDIMScheduler", **config.fields, DISTILLED_STEPS_FIELD: steps}


def check_teacher(pipe: Pipeline) -> None:
    """A ValueError unless the trainer can distill this pipeline: a pixel-space, unconditional or class-conditional
    network over a discrete VP (DDPM-style beta) schedule with a known prediction type."""
    config = pipe.scheduler_config
    class_name = config.get("_class_name", "DDPMScheduler")
    if "beta_schedule" not in CLASS_DEFAULTS.get(class_name, config):
        raise ValueError(f"cannot distill a teacher with a {class_name} schedule: progressive distillation needs a "
                         "discrete VP schedule of training betas (DDPMScheduler, DDIMScheduler and the like)")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in TEACHER_PREDICTIONS:
        raise ValueError(f"cannot distill a teacher with prediction_type={prediction!r}; allowed: "
                         f"{', '.join(TEACHER_PREDICTIONS)}")
    if pipe.vae is not None:
        raise ValueError("cannot distill a latent-space teacher yet (its training images would need a VAE encoder); "
                         "pass a pixel-space pipeline")
    if pipe.kind.text_conditional:
        raise ValueError("cannot distill a text-conditional teacher (no prompt data); pass an unconditional or "
                         "class-conditional pipeline")
    try:
        ddim_config(config)
    except ValueError as err:
        raise ValueError(f"cannot distill this teacher: its scheduler config does not resolve to DDIM: {err}") from None


def rounds(pipe: Pipeline, steps_from: int, steps_to: int) -> list[tuple[int, int]]:
    """[(student steps N, teacher steps per student step)] of the whole run: a conversion round (N0, 1) unless the
    teacher already predicts v, then (N0 / 2, 2), (N0 / 4, 2), ... down to steps_to."""
    for name, value in (("steps_from", steps_from), ("steps_to", steps_to)):
        positive_int(name, value)
    halvings = math.log2(steps_from / steps_to) if steps_from >= steps_to else -1.0
    if halvings != int(halvings) or halvings < 0:
        raise ValueError(f"steps_from={steps_from} does not halve down to steps_to={steps_to}; steps_from must be "
                         f"steps_to * 2**k for some k >= 0 (e.g. {steps_to}, {2 * steps_to}, {4 * steps_to}, ...)")
    build_plan(ddim_config(pipe.scheduler_config), steps_from)  # steps_from within the training schedule
    schedule = [] if pipe.scheduler_config.get("prediction_type", "epsilon") == "v_prediction" else [(steps_from, 1)]
    schedule += [(steps_from >> k, 2) for k in range(1, int(halvings) + 1)]
    if not schedule:
        raise ValueError(f"nothing to distill: the teacher already predicts v and steps_from == steps_to == {steps_to}")
    return schedule


class ProgressiveTarget:
    """One round's target (the trainer's `(student, batch) -> loss`): the student at `steps` DDIM steps learns
    `teacher_steps` (1 or 2) DDIM steps of `teacher` (guided by `guidance`) per step."""

    def __init__(self, teacher: Pipeline, steps: int, teacher_steps: int, guidance: float = 1.0):
        self.teacher, self.teacher_steps, self.guidance = teacher, teacher_steps, guidance
        self.plan = build_plan(resolve(None, student_scheduler_config(teacher.scheduler_config, steps)), steps)
        teacher_config = ddim_config(teacher.scheduler_config)
        self.teacher_plan = build_plan(teacher_config, steps * teacher_steps)
        stages = self.plan.stages
        for i, stage in enumerate(stages):  # the grids nest ("trailing"), and the student's step is linear in x0
            assert self.teacher_plan.stages[teacher_steps * i].timestep == stage.timestep, (i, stage)
            assert stage.update.raw == 0.0 and len(stage.update.denoised) == 1, stage.update
        v = [preconditioning("v_prediction", s) for s in stages]  # x0_hat = c_skip z + c_out v, the engine's own

        def table(values):
            return torch.tensor(values, dtype=torch.float64)

        self.alpha, self.sigma = table([s.alpha for s in stages]), table([s.sigma for s in stages])
        self.timestep = table([s.timestep for s in stages]).round().long()
        self.c_skip, self.c_out = table([c.c_skip for c in v]), table([c.c_out for c in v])
        # z_t'' = next_x * z_t + next_x0 * x0: (sigma_t'' / sigma_t, alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
        self.next_x = table([s.update.x for s in stages])
        self.next_x0 = table([s.update.denoised[0] for s in stages])
        self.weight = (self.alpha**2 / self.sigma**2).clamp(min=1.0)  # truncated SNR: max(SNR_t, 1)

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t [B, ...], student step i [B] int64) for clean images x0 [B, ...]: i uniform, eps ~ N(0, I)."""
        step = torch.randint(0, len(self.plan.stages), (x0.shape[0],), generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return rows_of(self.alpha, step, x0) * x0 + rows_of(self.sigma, step, x0) * eps, step

    @torch.no_grad()
    def teacher_x0(self, z: torch.Tensor, step: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Algorithm 2's x0~ [B, ...]: the x0 whose one student DDIM step from z lands where the teacher's steps do."""
        landed = teacher_landing(self.teacher, self.teacher_plan, self.teacher_steps, z, step, labels, self.guidance)
        z64 = z.double()  # float64: at high noise the numerator and denominator both nearly cancel
        target = (landed.double() - rows_of(self.next_x, step, z64) * z64) / rows_of(self.next_x0, step, z64)
        return target.to(z.dtype)

    def student_x0(self, student: nn.Module, z: torch.Tensor, step: torch.Tensor,
                   labels: torch.Tensor | None) -> torch.Tensor:
        """The student's x0_hat = alpha z - sigma v [B, ...] (v-prediction, as the Denoiser computes it in sampling)."""
        cond = {} if labels is None else {"class_labels": labels}
        v = student(z, self.timestep[step].to(z.device), **cond)[:, : z.shape[1]]
        return rows_of(self.c_skip, step, z) * z + rows_of(self.c_out, step, z) * v

    def __call__(self, student: nn.Module, batch: Batch) -> torch.Tensor:
        z, step = self.noisy(batch.images, batch.generator)
        error = (self.student_x0(student, z, step, batch.labels) - self.teacher_x0(z, step, batch.labels))
        return (self.weight[step].to(z) * error.square().flatten(1).mean(1)).mean()


@torch.no_grad()
def teacher_landing(pipe: Pipeline, plan: Plan, k: int, z: torch.Tensor, step: torch.Tensor,
                    labels: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Where the teacher's DDIM lands [B, ...] from z, row b taking stages k * step[b] .. k * (step[b] + 1) - 1 of
    its plan (a `ddim_config` plan), guided by `guidance`: the engine's Denoiser and sampler loop, one call per
    distinct step in the batch."""
    config = ddim_config(pipe.scheduler_config)
    kind, constants = parameterization(config)
    cond, uncond = pipe.conditioning(z.shape[0], labels, None, None, guidance)
    landed = torch.empty_like(z)
    for i in step.unique().tolist():
        rows = (step == i).nonzero()[:, 0].to(z.device)
        part = replace(plan, stages=plan.stages[k * i: k * (i + 1)])  # t (-> t') -> t''
        denoiser = Denoiser(NetworkCall(pipe.model, pipe.kind.prediction_channels), part, kind, batch=len(rows),
                            device=z.device, cond={n: c[rows] for n, c in cond.items()},
                            uncond=None if uncond is None else {n: c[rows] for n, c in uncond.items()},
                            guidance_scale=guidance, **constants)
        seeds = torch.zeros(len(rows), dtype=torch.int64, device=z.device)  # DDIM (eta 0) draws no noise
        landed[rows] = run_plan(part, denoiser, z[rows], seeds, postprocessing(config))
    return landed


def rows_of(values: torch.Tensor, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[step] [B, 1, 1, ...] in the dtype and on the device of `like`, to broadcast against it."""
    return values[step].reshape(-1, *([1] * (like.dim() - 1))).to(like)
