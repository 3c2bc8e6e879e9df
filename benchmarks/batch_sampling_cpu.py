"""Images/s of `blitzdiff sample --out-dir` on this machine's CPU: one process (1 or 2 torch threads) against
torchrun's data-parallel processes (1 thread each), each configuration run `--repeats` times into a fresh folder
(medians, min and max of the job's own images/s: first batch to last rank's end, so model load and process start
are excluded; each run's packed samples.npz must be byte-identical across configurations of one recipe).

    python benchmarks/batch_sampling_cpu.py --json benchmarks/results/batch_sampling_cpu.json

Run it on a quiet machine: each run records how many cores other processes kept busy meanwhile (/proc/stat's busy
time less this run's own CPU time), and a run where they used more than a quarter of a core is flagged unstable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import blitzdiff

SUMMARY = re.compile(r"^(\d+) images in ([\d.]+) s: ([\d.]+) images/s over (\d+) rank", re.M)
CONFIGS = [  # (name, processes, threads per process)
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("torchrun 2 processes x 1 thread", 2, 1),
]


def busy_seconds() -> float:
    """CPU seconds all processes spent busy since boot (/proc/stat: user nice system irq softirq steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(model: str, processes: int, threads: int, n: int, shard: int, steps: int, folder: Path) -> dict:
    job = ["-m", "blitzdiff", "sample", "--model", model, "-n", str(n), "--steps", str(steps), "--shard-size",
           str(shard), "--threads", str(threads), "--out-dir", str(folder), "--no-progress"]
    command = [sys.executable, *job] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *job]
    busy, own, start = busy_seconds(), children_seconds(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    others = (busy_seconds() - busy - (children_seconds() - own)) / (time.monotonic() - start)
    images, seconds, rate, ranks = SUMMARY.search(done.stdout).groups()
    digest = hashlib.sha256((folder / "samples.npz").read_bytes()).hexdigest()
    recipe = json.loads((folder / "manifest.json").read_text())["recipe"]
    return {"images": int(images), "seconds": float(seconds), "images_per_s": float(rate), "ranks": int(ranks),
            "other_processes_cores": round(max(others, 0.0), 3), "unstable": others > 0.25,
            "samples_sha256": digest, "sampler": recipe["sampler"],
            "guidance_scale": recipe["guidance_scale"], "batch": recipe["batch"],
            "command": " ".join(["python" if c == sys.executable else c for c in command])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dit-digits", "unet-digits"])
    parser.add_argument("-n", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for name, processes, threads in CONFIGS:
                runs = []
                for repeat in range(args.repeats):
                    folder = Path(scratch) / f"{model}-{processes}-{threads}-{repeat}"
                    runs.append(run(model, processes, threads, args.n, args.shard_size, args.steps, folder))
                    shutil.rmtree(folder)
                    print(f"{model} {name} #{repeat}: {runs[-1]['images_per_s']:.1f} images/s", flush=True)
                rates = [r["images_per_s"] for r in runs]
                rows.append({"model": model, "config": name, "processes": processes, "threads": threads,
                             "median_images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                             "unstable": any(r["unstable"] for r in runs), "runs": runs})
    result = {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "blitzdiff": blitzdiff.__version__, "python": platform.python_version(),
              "n": args.n, "shard_size": args.shard_size, "steps": args.steps, "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']:12} {row['config']:34} {row['median_images_per_s']:6.1f} images/s "
              f"(min {row['min']:.1f}, max {row['max']:.1f}){'  UNSTABLE' if row['unstable'] else ''}")


if __name__ == "__main__":
    main()
