"""Train the shipped few-step students of the embedded DiT (blitzdiff/assets/dit-digits), on CPU, with
blitzdiff.distill, and install them under blitzdiff/assets/ (float16 weights, like the teachers).

- dit-digits-pd2, dit-digits-pd: progressive distillation (Salimans & Ho 2022) of the teacher's 32-step DDIM,
  guided at the teacher's scale: a conversion round to v-prediction at 32 steps, then 32 -> 16 -> 8 -> 4 (700
  iterations per round), -> 2 (dit-digits-pd2), -> 1 (dit-digits-pd), the last rounds longer (each later round has
  fewer steps to learn, but its errors compound). Each is a student for its own step count: a progressive student
  samples worse at more steps than it was distilled for (its last round trained only its own timesteps).
- dit-digits-pd4: its own run of the same rounds down to 4 steps, twice as long per round (the chain's 4-step
  student, 700 iterations per round, reached FD 1.20x the teacher's 50-step one; the target is 1.15x).
- dit-digits-cd: consistency distillation (Song et al. 2023, LCM's discrete time) on a 20-point skipped schedule.
  Its teacher is the guided DiT converted to v-prediction at 20 steps (progressive distillation's conversion round:
  an epsilon consistency function divides by alpha_T ~ 0.006 at one step); the student keeps v-prediction.

Each stage resumes from its checkpoint in the work folder, so a killed run continues where it stopped. Every run is
seeded; training seconds per stage go to benchmarks/results/students_training_cpu.json. Score the installed
students with `blitzdiff eval` (the README's command).

    python scripts/train_few_step_students.py [--only pd pd4 cd] [--work /tmp/students] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import blitzdiff
from blitzdiff import distill, quality

ASSETS = Path(quality.__file__).parent / "assets"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "students_training_cpu.json"
TEACHER = "dit-digits"
GUIDANCE = 1.25  # the teacher's recommended scale (its model_index.json), baked into both students
COMMON = {"batch": 32, "lr": 2e-4, "seed": 0, "resume": True}

# (folder, steps_from, steps_to, iterations per round, installed name or None): progressive runs, each stage's
# teacher the previous stage's student
PD_STAGES = (("pd-4", 32, 4, 700, None), ("pd-2", 4, 2, 1200, "dit-digits-pd2"), ("pd-1", 2, 1, 2000, "dit-digits-pd"))
PD4_STAGES = (("pd4", 32, 4, 1400, "dit-digits-pd4"),)
CD_STEPS = 20  # the consistency schedule's length (LCM's original_inference_steps)
CD_CONVERSION_ITERS = 500
CD_ITERS = 5000


def train_pd(work: Path, stages=PD_STAGES) -> dict[str, float]:
    seconds, teacher = {}, TEACHER
    for folder, steps_from, steps_to, iters, name in stages:
        start = time.perf_counter()
        distill.progressive(teacher, work / folder, steps_from=steps_from, steps_to=steps_to, iters_per_round=iters,
                            guidance=GUIDANCE if teacher == TEACHER else None, **COMMON)
        seconds[folder] = time.perf_counter() - start
        teacher = work / folder
        if name is not None:
            install(teacher, name)
    return seconds


def train_cd(work: Path) -> dict[str, float]:
    start = time.perf_counter()
    distill.progressive(TEACHER, work / "cd-teacher", steps_from=CD_STEPS, steps_to=CD_STEPS,
                        iters_per_round=CD_CONVERSION_ITERS, guidance=GUIDANCE, **COMMON)
    seconds = {"cd-teacher": time.perf_counter() - start}
    start = time.perf_counter()
    distill.consistency(work / "cd-teacher", work / "cd", iters=CD_ITERS, original_steps=CD_STEPS, **COMMON)
    seconds["cd"] = time.perf_counter() - start
    install(work / "cd", "dit-digits-cd")
    return seconds


def install(folder: Path, name: str) -> None:
    """Copy a student folder to blitzdiff/assets/<name> without its training checkpoint, weights in float16."""
    target = ASSETS / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("distill_checkpoint.pt*"))
    for weights in target.glob("*/diffusion_pytorch_model.safetensors"):
        tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
    print(f"installed {target}")


RUNS = {"pd": train_pd, "pd4": lambda work: train_pd(work, PD4_STAGES), "cd": train_cd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--work", default="/tmp/students", help="training folders and checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    for method in args.only:
        seconds = RUNS[method](work)
        record = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # read now: another run may write too
        record[f"dit-digits-{method}"] = {
            "train_seconds": seconds, "total_seconds": sum(seconds.values()), "threads": args.threads,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
            "versions": {"blitzdiff": blitzdiff.__version__, "torch": torch.__version__},
            "settings": {"pd": {"pd_stages": PD_STAGES}, "pd4": {"pd_stages": PD4_STAGES},
                         "cd": {"steps": CD_STEPS, "conversion_iters": CD_CONVERSION_ITERS, "iters": CD_ITERS}}[method],
            "common": {**COMMON, "guidance": GUIDANCE},
        }
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
