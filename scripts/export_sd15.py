"""Export the full SD 1.5 UNet (the sd15-unet preset: its architecture, random weights) to ONNX and run it once.

OMP_NUM_THREADS=1 nice python scripts/export_sd15.py --json benchmarks/results/export_sd15_cpu.json
The float32 denoiser (859.5M parameters, 3.4 GB: external data) is exported to a temporary folder, opened in ONNX
Runtime's CPU provider and run once at batch 1 (64x64x4 latents, a 77x768 prompt) against the torch forward.
Recorded: export seconds, folder bytes, peak RSS after each phase, ORT session and forward seconds, the torch forward
seconds, the largest difference relative to the largest torch value, versions. The JSON is rewritten after every
phase ("status": the phase reached), so a run killed for memory or time leaves what it had measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import onnxscript
import torch

import blitzdiff
from blitzdiff.export import OnnxGraph, export_onnx, read_manifest
from blitzdiff.models import build_preset


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="the results file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "status": "started", "model": "sd15-unet (random weights)",
        "what": "denoiser", "dtype": "float32", "batch_range": [1, 2], "run_batch": 1, "threads": args.threads,
        "provider": "CPUExecutionProvider", "cpu": platform.processor() or platform.machine(),
        "note": "2-core machine shared with other jobs; one run each, no warm-up: indicative, not a benchmark",
        "versions": {"blitzdiff": blitzdiff.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()}}

    def phase(status: str, **figures: Any) -> None:
        record.update(figures, status=status, peak_rss_gib=peak_rss_gib())
        record.setdefault("peak_rss_gib_by_phase", {})[status] = record["peak_rss_gib"]
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(status, figures, f"peak RSS {record['peak_rss_gib']} GiB", flush=True)

    model, scheduler = build_preset("sd15-unet")
    pipe = blitzdiff.Pipeline(model, scheduler, None, name="sd15-unet")
    phase("built", parameters=sum(p.numel() for p in model.parameters()))
    root = Path(tempfile.mkdtemp(prefix="blitzdiff-sd15-"))
    try:
        run(pipe, root, args.threads, phase)
    except Exception as err:
        phase(f"failed after {record['status']}", error=f"{type(err).__name__}: {err}"[:1000])
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(pipe: blitzdiff.Pipeline, root: Path, threads: int, phase: Any) -> None:
    """Export, the torch forward, the ORT session, the ORT forward: each phase recorded as it completes."""
    start = time.perf_counter()
    folder = export_onnx(pipe, root / "unet", batch=(1, 2))
    files = read_manifest(folder)["files"]
    phase("exported", export_s=round(time.perf_counter() - start, 1),
          folder_bytes=sum(entry["bytes"] for entry in files.values()), files=sorted(files))

    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 64, 64, generator=generator), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 77, 768, generator=generator)}
    start = time.perf_counter()
    with torch.no_grad():
        expected = pipe.model(**inputs)
    phase("torch_forward", torch_forward_s=round(time.perf_counter() - start, 2))

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    start = time.perf_counter()
    graph = OnnxGraph(folder, session_options=options)
    phase("ort_session", ort_session_s=round(time.perf_counter() - start, 1))
    start = time.perf_counter()
    out = graph(**inputs)
    seconds = time.perf_counter() - start
    difference = ((out - expected).abs().max() / expected.abs().max()).item()
    phase("ok", ort_forward_s=round(seconds, 2), max_relative_difference=float(f"{difference:.3g}"))


if __name__ == "__main__":
    main()
