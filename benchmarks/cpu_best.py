"""blitzdiff's CPU modes against diffusers' best CPU modes, one `blitzdiff bench` run per model, same process per model:
unet-digits, dit-digits and a 6.5 M-parameter 32x32 UNet2D (random weights, written here as a diffusers folder),
DPM-Solver++(2M) 10 steps, batches 1 and 8, weights channels-last on both sides where it is an option; after the
sweeps every system is timed again call by call in rotating order (bench --interleave).

    python benchmarks/cpu_best.py --out benchmarks/results/cpu_best [--threads 2] [--repeats 5]

Writes <out>/<model>.json (bench's JSON) and prints each run's report, whose "fastest against fastest" tables give
the comparison. Run it on a quiet machine: bench warns (and says so in its JSON) when other work shared the CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ["eager", "compile", "compile-loop", "onnxruntime"]
BASELINES = ["diffusers", "diffusers-compile", "diffusers-channels-last", "diffusers-compile-channels-last"]
# 6,472,195 parameters: two resolutions of 64 / 128 channels and a self-attention level at 16x16.
UNET32 = {"sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (64, 128, 128),
          "layers_per_block": 2, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 32}


def write_unet32(folder: Path) -> Path:
    """A diffusers pipeline folder: the UNet above with seeded random weights and a DPM-Solver++ scheduler."""
    import diffusers

    torch.manual_seed(0)
    diffusers.UNet2DModel(**UNET32).save_pretrained(folder / "unet")
    diffusers.DPMSolverMultistepScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
                                             '"scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}\n')
    return folder


def wait_for_quiet(limit: float = 0.5, patience_s: float = 240.0) -> None:
    """Wait (up to patience_s) for the 1-minute load average to fall below `limit`: back-to-back runs would otherwise
    start while the previous one still counts in it, and bench flags such a run as loaded."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-model JSON files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["unet-digits", "dit-digits", "unet32"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = str(write_unet32(Path(tmp) / name)) if name == "unet32" else name
            command = [sys.executable, "-m", "blitzdiff", "bench", "--model", model, "--sampler", "dpmpp_2m",
                       "--modes", *MODES, "--baseline", *BASELINES, "--batches", "1", "8", "--steps", "10",
                       "--throughput-steps", "10", "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--channels-last", "--interleave", "--json", str(args.out / f"{name}.json")]
            wait_for_quiet()
            print(f"$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
