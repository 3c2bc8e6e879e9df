"""The one training loop of blitzdiff.distill: AdamW on a student against a pluggable target, seeded and resumable.

A target is a callable `(student, batch) -> loss` (progressive_distillation.ProgressiveTarget is one); it draws its
own noise from `batch.generator`. The loop draws the data order from a second generator, so a run is a function
of its seed. Every `checkpoint_every` iterations and at the end of each round the loop writes one checkpoint
(student, optimizer, both generators, torch's global RNG, round, iteration, the round's teacher weights), atomically
(a temporary file, then os.replace): an interrupted run keeps the last complete checkpoint, and `resume` continues
from it bit-for-bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_NAME = "distill_checkpoint.pt"


@dataclass(frozen=True)
class Batch:
    """images [B, C, H, W] in [-1, 1] on the student's device; labels [B] int64 or None; generator: the CPU
    generator the target draws its noise (and timesteps) from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    generator: torch.Generator


Target = Callable[[nn.Module, Batch], torch.Tensor]  # (student, batch) -> scalar loss


@dataclass(frozen=True)
class Checkpoint:
    """Where a run stopped: after `iteration` iterations of round `round`."""

    round: int
    iteration: int
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    teacher: dict[str, torch.Tensor] | None  # the round's teacher weights when it is an earlier student, else None
    target: dict[str, torch.Tensor] | None  # the target's own state (consistency: its EMA network), else None


class Trainer:
    """The loop and its checkpoints for one run (all rounds). settings: what a resumed run must share with the run
    that wrote the checkpoint (step counts, batch, lr, seed, ...); a mismatch is a ValueError."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, *, batch: int, lr: float, seed: int,
                 folder: Path, checkpoint_every: int, settings: Mapping[str, Any], progress: bool = True):
        self.images, self.labels = images, labels
        self.batch, self.lr, self.progress = batch, lr, progress
        self.path = Path(folder) / CHECKPOINT_NAME
        self.checkpoint_every = checkpoint_every
        self.settings = dict(settings)
        torch.manual_seed(seed)
        self.noise = torch.Generator().manual_seed(seed)  # the target's noise and timesteps
        self.order = torch.Generator().manual_seed(seed + 1)  # which images each batch holds

    def restore(self, resume: bool) -> Checkpoint | None:
        """resume: the last checkpoint (None when there is none), with the generators and torch's RNG set back to it.
        Not resume: None, or a ValueError when a checkpoint is there (a new run must not overwrite an old one)."""
        if not resume:
            if self.path.exists():
                raise ValueError(f"{self.path} exists: pass resume=True to continue that run, or another out_dir")
            return None
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["settings"] != self.settings:
            changed = sorted(k for k in {*state["settings"], *self.settings}
                             if state["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} was written by a run with other settings ({', '.join(changed)}: "
                             f"{[state['settings'].get(k) for k in changed]} there, "
                             f"{[self.settings.get(k) for k in changed]} now); resume with the same ones, or write "
                             "to another folder")
        torch.set_rng_state(state["rng"]["torch"])
        self.noise.set_state(state["rng"]["noise"])
        self.order.set_state(state["rng"]["order"])
        return Checkpoint(state["round"], state["iteration"], state["student"], state["optimizer"], state["teacher"],
                          state["target"])

    def run(self, student: nn.Module, target: Target, *, round_index: int, iters: int, start: int = 0,
            optimizer_state: dict[str, Any] | None = None, teacher: Mapping[str, torch.Tensor] | None = None,
            target_state: Mapping[str, torch.Tensor] | None = None, desc: str = "distill") -> list[float]:
        """Train `student` in place for iterations start .. iters - 1 of round `round_index`; returns their losses.
        teacher: the round's teacher weights to store in checkpoints (None: the original teacher, reloaded). A target
        with after_step(student) has it called after every optimizer step; one with state_dict() / load_state_dict()
        (consistency's EMA network) has its state checkpointed, and restored from target_state."""
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        if target_state is not None:
            target.load_state_dict(target_state)
        device = params[0].device
        bar = _bar(self.progress, iters, start, desc)
        losses = []
        try:
            for iteration in range(start, iters):
                index = torch.randint(0, len(self.images), (self.batch,), generator=self.order)
                labels = None if self.labels is None else self.labels[index].to(device)
                loss = target(student, Batch(self.images[index].to(device), labels, self.noise))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if hasattr(target, "after_step"):
                    target.after_step(student)
                losses.append(loss.item())
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                    bar.update(1)
                done = iteration + 1
                if done % self.checkpoint_every == 0 or done == iters:
                    self.save(round_index, done, student, optimizer, teacher, target)
        finally:
            if bar is not None:
                bar.close()
        return losses

    def save(self, round_index: int, iteration: int, student: nn.Module, optimizer: torch.optim.Optimizer,
             teacher: Mapping[str, torch.Tensor] | None, target: Any = None) -> None:
        """Write the checkpoint atomically: a complete temporary file, then os.replace over the previous one."""
        state = {
            "settings": self.settings, "round": round_index, "iteration": iteration,
            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "teacher": None if teacher is None else dict(teacher),
            "target": target.state_dict() if hasattr(target, "state_dict") else None,
            "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state(), "order": self.order.get_state()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)


def _bar(progress: bool, total: int, initial: int, desc: str):
    """A tqdm bar over iterations, its postfix the last loss (tqdm shows the rate: it/s)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", leave=True)
