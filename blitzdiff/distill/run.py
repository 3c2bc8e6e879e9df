"""`blitzdiff.distill.progressive`: a teacher in, a few-step student pipeline folder out.

Every check runs before training starts; the rounds then run on the one trainer loop (blitzdiff.distill.trainer),
and the student is written as a diffusers-layout pipeline that `blitzdiff.load` samples with `ddim` at its step count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..engine.inputs import finite_number
from ..engine.loading import load, model_path
from ..engine.pipeline import Pipeline
from .consistency_distillation import ORIGINAL_STEPS, ConsistencyTarget
from .consistency_distillation import student_scheduler_config as consistency_scheduler_config
from .data import load_images
from .progressive_distillation import (
    DEFAULT_STEPS_FROM,
    DISTILLED_STEPS_FIELD,
    ProgressiveTarget,
    check_teacher,
    rounds,
    student_scheduler_config,
)
from .trainer import Trainer

COMPONENTS = {"DiTTransformer2DModel": "transformer", "UNet2DModel": "unet"}  # diffusers' folder per network class
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def progressive(
    teacher: Pipeline | str | Path,
    out_dir: str | Path,
    *,
    steps_from: int | None = None,
    steps_to: int = 1,
    iters_per_round: int,
    batch: int,
    lr: float,
    guidance: float | None = None,
    data: str | Path | None = None,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 500,
    progress: bool = True,
) -> Path:
    """Progressive distillation (Salimans & Ho 2022) of `teacher` (a Pipeline, a pipeline folder or an embedded
    model's name) into a student at `steps_to` DDIM steps; returns `out_dir`, a pipeline folder.

    steps_from: the teacher's step count N0 (None: the step count a distilled teacher records, else 64); it must be
    steps_to * 2**k. Each round trains iters_per_round AdamW iterations (batch images, learning rate lr). guidance:
    the teacher's classifier-free guidance scale, baked into the student (None: unguided). data: training images
    (blitzdiff.distill.data.load_images; None: the digits train split). Checkpoints go to out_dir every
    checkpoint_every iterations; resume=True continues from the last one bit-for-bit.
    """
    pipe = teacher if isinstance(teacher, Pipeline) else load(teacher)
    check_teacher(pipe)
    if steps_from is None:
        steps_from = int(pipe.scheduler_config.get(DISTILLED_STEPS_FIELD, DEFAULT_STEPS_FROM))
    schedule = rounds(pipe, steps_from, steps_to)
    images, labels, guidance = _checked_run(pipe, iters_per_round, batch, checkpoint_every, seed, lr, guidance, data,
                                            iters_name="iters_per_round")
    out = Path(out_dir)
    settings = {"teacher": pipe.name, "rounds": schedule, "iters_per_round": iters_per_round, "batch": batch,
                "lr": lr, "guidance": guidance, "data": str(data), "seed": seed}
    trainer = Trainer(images, labels, batch=batch, lr=lr, seed=seed, folder=out, checkpoint_every=checkpoint_every,
                      settings=settings, progress=progress)
    state = trainer.restore(resume)
    first = 0 if state is None else state.round
    student = copy.deepcopy(pipe.model).float().requires_grad_(True).eval()  # eval: no dropout, a deterministic target
    if state is not None:
        student.load_state_dict(state.student)
    for r in range(first, len(schedule)):
        steps, teacher_steps = schedule[r]
        resumed = state is not None and r == first
        if r == 0:  # the original teacher, guided
            round_teacher, round_guidance, teacher_state = pipe, guidance, None
        else:  # the previous round's student, guidance already learned
            teacher_state = state.teacher if resumed else {k: v.detach().clone() for k, v in
                                                           student.state_dict().items()}
            frozen = copy.deepcopy(student).requires_grad_(False)
            frozen.load_state_dict(teacher_state)
            config = student_scheduler_config(pipe.scheduler_config, schedule[r - 1][0])
            round_teacher, round_guidance = Pipeline(frozen, config, name=f"{pipe.name}-{schedule[r - 1][0]}"), 1.0
        target = ProgressiveTarget(round_teacher, steps, teacher_steps, round_guidance)
        trainer.run(student, target, round_index=r, iters=iters_per_round, start=state.iteration if resumed else 0,
                    optimizer_state=state.optimizer if resumed else None, teacher=teacher_state,
                    desc=f"round {r + 1}/{len(schedule)}: " + (f"{2 * steps} -> {steps} steps" if teacher_steps == 2
                                                               else f"to v-prediction at {steps} steps"))
    return save_student(out, student, pipe, teacher, student_scheduler_config(pipe.scheduler_config, steps_to),
                        {"method": "progressive", "teacher": pipe.name, "steps": steps_to, "guidance": guidance})


def consistency(
    teacher: Pipeline | str | Path,
    out_dir: str | Path,
    *,
    iters: int,
    batch: int,
    lr: float,
    guidance: float | None = None,
    ema_decay: float = 0.95,
    loss: str = "huber",
    original_steps: int = ORIGINAL_STEPS,
    data: str | Path | None = None,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 500,
    progress: bool = True,
) -> Path:
    """Consistency distillation (Song et al. 2023; Luo et al. 2023) of `teacher` (a Pipeline, a pipeline folder or an
    embedded model's name) into a student the `lcm` sampler runs at 1-8 steps; returns `out_dir`, a pipeline folder.
    The student keeps the teacher's parameterization: for one-step sampling distill a v-prediction teacher (e.g. the
    conversion round of progressive(), steps_from == steps_to == original_steps).

    iters AdamW iterations of batch images at learning rate lr; guidance: the teacher's classifier-free guidance,
    baked into the student (None: unguided); ema_decay: the target network's EMA rate; loss: "huber" (pseudo-Huber,
    c = 0.001) or "l2"; original_steps: the skipped schedule's length N (LCM's 50; it must divide the training
    timesteps). data, seed, resume, checkpoint_every: as progressive()."""
    pipe = teacher if isinstance(teacher, Pipeline) else load(teacher)
    check_teacher(pipe)
    images, labels, guidance = _checked_run(pipe, iters, batch, checkpoint_every, seed, lr, guidance, data)
    out = Path(out_dir)
    settings = {"method": "consistency", "teacher": pipe.name, "iters": iters, "batch": batch, "lr": lr,
                "guidance": guidance, "ema_decay": ema_decay, "loss": loss, "original_steps": original_steps,
                "data": str(data), "seed": seed}
    trainer = Trainer(images, labels, batch=batch, lr=lr, seed=seed, folder=out, checkpoint_every=checkpoint_every,
                      settings=settings, progress=progress)
    state = trainer.restore(resume)
    student = copy.deepcopy(pipe.model).float().requires_grad_(True).eval()
    target = ConsistencyTarget(pipe, student, guidance, ema_decay=ema_decay, loss=loss, original_steps=original_steps)
    if state is not None:
        student.load_state_dict(state.student)
    trainer.run(student, target, round_index=0, iters=iters, start=0 if state is None else state.iteration,
                optimizer_state=None if state is None else state.optimizer,
                target_state=None if state is None else state.target, desc="consistency distillation")
    scheduler = consistency_scheduler_config(pipe.scheduler_config, original_steps)
    record = {"method": "consistency", "teacher": pipe.name, "guidance": guidance, "original_steps": original_steps}
    return save_student(out, student, pipe, teacher, scheduler, record)


def _checked_run(pipe: Pipeline, iters: Any, batch: Any, checkpoint_every: Any, seed: Any, lr: Any, guidance: Any,
                 data: str | Path | None, iters_name: str = "iters") -> tuple[Any, Any, float]:
    """(images, labels, guidance) after checking a run's numbers, guidance against the teacher and the data."""
    for name, value in ((iters_name, iters), ("batch", batch), ("checkpoint_every", checkpoint_every),
                        ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'seed' else 1}, got {value!r}")
    lr = finite_number("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    guidance = 1.0 if guidance is None else finite_number("guidance", guidance)
    channels, height, width = pipe.latent_shape(None, None)
    pipe.conditioning(1, 0 if pipe.kind.class_conditional else None, None, None, guidance)  # guidance possible?
    images, labels = load_images(data, channels=channels, size=(height, width),
                                 class_conditional=pipe.kind.class_conditional)
    if labels is not None and (labels.min() < 0 or labels.max() >= pipe.num_classes):
        raise ValueError(f"{data}: labels must lie in 0..{pipe.num_classes - 1} (the teacher's classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return images, labels, guidance


def save_student(folder: Path, student: nn.Module, pipe: Pipeline, source: Pipeline | str | Path,
                 scheduler: dict[str, Any], record: dict[str, Any]) -> Path:
    """The diffusers layout of the embedded models: model_index.json (the teacher's, when it came from a folder),
    <component>/{config.json, weights (float32 safetensors)}, scheduler/scheduler_config.json (`scheduler`: the
    student's sampler), `record` under "_blitzdiff_distillation" (with a distilled teacher's own record under
    "teacher_distillation")."""
    model_class = student.diffusers_class
    if model_class not in COMPONENTS:
        raise ValueError(f"cannot save a {model_class} student; supported: {', '.join(COMPONENTS)}")
    component = COMPONENTS[model_class]
    index: dict[str, Any] = {"_class_name": "DiTPipeline" if component == "transformer" else "DDPMPipeline"}
    if not isinstance(source, Pipeline):
        teacher_index = model_path(source) / "model_index.json"
        if teacher_index.is_file():
            index = {k: v for k, v in json.loads(teacher_index.read_text()).items() if k not in ("unet", "transformer")}
    if "_blitzdiff_distillation" in index:  # the teacher is itself a student: keep the lineage
        record = {**record, "teacher_distillation": index["_blitzdiff_distillation"]}
    index |= {component: ["diffusers", model_class], "scheduler": ["diffusers", scheduler["_class_name"]],
              "_blitzdiff_distillation": record}
    if pipe.kind.class_conditional:
        index["_blitzdiff_guidance_scale"] = 1.0  # the teacher's guidance is in the weights: sample unguided
    (folder / component).mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"_class_name": model_class, **student.config}
    (folder / component / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    tensors = {k: v.detach().float().cpu().clone(memory_format=torch.contiguous_format)  # safetensors: dense
               for k, v in student.state_dict().items()}  # and no shared storage
    save_file(tensors, str(folder / component / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
