"""Export the embedded models (network and whole loops) and compare ONNX Runtime (CPU provider) with torch.

python scripts/export_parity.py --json benchmarks/results/export_parity_cpu.json
Records, per export: the export time, the folder size, and the largest difference to torch relative to the
largest torch value (network: on 5 random inputs; loop: `pipe.sample(..., output_type="raw")` of 5 seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

import blitzdiff
from blitzdiff.export import OnnxGraph, export_onnx, read_manifest


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def exported(pipe, folder: Path, **options) -> tuple[OnnxGraph, dict]:
    start = time.perf_counter()
    export_onnx(pipe, folder, **options)
    seconds = time.perf_counter() - start
    size = sum(entry["bytes"] for entry in read_manifest(folder)["files"].values())
    return OnnxGraph(folder), {"export_s": round(seconds, 1), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m", "unipc", "euler_ancestral",
                                                           "dpmpp_2m_sde", "lcm"])
    parser.add_argument("--models", nargs="+", default=["unet-digits", "dit-digits"])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            pipe = blitzdiff.load(name)
            graph, row = exported(pipe, Path(root) / f"{name}-denoiser")
            inputs = {"sample": torch.randn(5, *pipe.latent_shape(None, None), generator=torch.Generator()
                                            .manual_seed(0)), "timestep": torch.tensor([999.0, 700, 400, 100, 1])}
            if pipe.kind.class_conditional:
                inputs["class_labels"] = torch.tensor([0, 3, 5, 9, 10])  # 10: the null class
            with torch.no_grad():
                expected = pipe.model(**inputs)
            rows.append({"model": name, "what": "denoiser", **row, "relative_error": relative(graph(**inputs),
                                                                                            expected)})
            print(rows[-1], flush=True)
            for sampler in args.samplers:
                graph, row = exported(pipe, Path(root) / f"{name}-{sampler}", what="loop", sampler=sampler,
                                      steps=args.steps)
                seeds = torch.tensor([0, 1, 2, 3, 4])
                labels = {"class_labels": torch.tensor([0, 3, 5, 7, 9])} if pipe.kind.class_conditional else {}
                scale = pipe.default_guidance_scale
                expected = pipe.sample(5, steps=args.steps, sampler=sampler, seeds=seeds, guidance_scale=scale,
                                       output_type="raw", progress=False, **labels)
                extra = {"guidance_scale": torch.tensor(scale)} if scale != 1.0 else {}
                out = graph(noise=pipe.initial_noise(seeds, pipe.latent_shape(None, None)), seeds=seeds, **labels,
                            **extra)
                rows.append({"model": name, "what": "loop", "sampler": sampler, "steps": args.steps,
                             "guidance_scale": scale, **row, "relative_error": relative(out, expected)})
                print(rows[-1], flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "provider": "CPUExecutionProvider",
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
