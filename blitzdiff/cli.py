"""The `blitzdiff` command: `sample`, `pack`, `info`, `eval`, `bench`, `profile`, `export`, `distill`, `serve`. Here
the parser and the dispatch; what each command does is in blitzdiff.commands. Errors print one line (naming the rank
in a torchrun job), exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .commands import (
    run_bench,
    run_distill,
    run_eval,
    run_export,
    run_info,
    run_pack,
    run_profile,
    run_sample,
    run_serve,
)
from .engine.config import SAMPLERS
from .engine.loading import DEFAULT_MODEL, EMBEDDED
from .kernels._backends import ALL_BACKENDS
from .malloc import tune_malloc_once
from .models import PRESETS


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, like the commands' own (argparse prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def _add_model_options(parser: argparse.ArgumentParser, many: bool = False) -> None:
    embedded = ", ".join(f"{name} (default)" if name == DEFAULT_MODEL else name for name in EMBEDDED)
    parser.add_argument("--model", default=[None] if many else None, nargs="+" if many else None,
                        help=f"a checkpoint folder or file, an embedded model: {embedded}, or a random-weight preset: "
                        f"{', '.join(PRESETS)}" + ("; several for one table, each MODEL[:SAMPLER][@STEPS,...] to give "
                                                    "it its own sampler and step counts (e.g. dit-digits:ddim@4,50)"
                                                    if many else ""))
    parser.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default: the folder's "
                        "scheduler)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                        "model's recommended one, from its model_index.json; else 4.0 for a DiT with a null class, "
                        "else 1.0)")


def _add_distill_options(parser: argparse.ArgumentParser, iters: str, scored: str) -> None:
    """The options every `blitzdiff distill` method takes."""
    parser.add_argument("--teacher", default=None, help=f"a pipeline folder or an embedded model (default "
                        f"{DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, help="the student's pipeline folder (checkpoints go there too)")
    parser.add_argument("--iters", type=int, required=True, help=iters)
    parser.add_argument("--batch", type=int, default=64, help="images per iteration (default 64)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--guidance", type=float, default=None, help="the teacher's guidance scale, learned by the "
                        "student (default: unguided)")
    parser.add_argument("--data", default=None, help="training images: .npz / .npy / a folder of PNGs (default: the "
                        "digits train split)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints")
    parser.add_argument("--eval", type=int, default=300, metavar="N", help=f"after training, score {scored} with N "
                        "samples each (16x16 digits models on the digits data only: the judge is a digits "
                        "classifier; 0: skip)")
    parser.add_argument("--json", help="also write the run (settings, training seconds, the table) to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blitzdiff", description="Fast, sync-free sampling of diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="sample a model and write a PNG grid, or, with --out-dir, N samples as "
                                 "resumable shards packed into samples.npz (under torchrun: split across the ranks)")
    _add_model_options(sample)
    sample.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    sample.add_argument("--dtype", default="float32", help="the network's dtype: float32 (default), float16, "
                        "bfloat16")
    sample.add_argument("-n", type=int, default=16, help="number of samples")
    sample.add_argument("--seed", type=int, default=0, help="sample i gets seed + i")
    sample.add_argument("--class", dest="classes", type=int, nargs="+", default=None,
                        help="class label(s) for a class-conditional model (default: 0, 1, 2, ... cycling)")
    sample.add_argument("--output", default=None, help="PNG grid to write, in an existing folder (default "
                        "samples.png)")
    sample.add_argument("--mode", choices=["eager", "compile", "step", "graph", "onnxruntime", "tensorrt"],
                        default=None, help="run through Pipeline.compile(mode): a first call builds (compile / CUDA "
                        "graph capture; onnxruntime / tensorrt export first), a second one is timed (default: the "
                        "plain eager loop, one call); with --out-dir, the job's runtime, compiled with the one bucket "
                        "--batch")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")
    job = sample.add_argument_group("sharded output (--out-dir; run under torchrun to split the work across ranks)")
    job.add_argument("--out-dir", help="write samples 0..n-1 here as shards + manifest.json, then samples.npz (arr_0 "
                     "uint8 [N, H, W, C], arr_1 labels); a re-run of the same command resumes")
    job.add_argument("--format", dest="fmt", choices=["npz", "png"], default=None, help="shard-XXXXX.npz files "
                     "(default) or images/NNNNNN.png named by sample index")
    job.add_argument("--batch", type=int, default=None, help="rows per network call (default 64); part of the "
                     "recipe: it changes float rounding")
    job.add_argument("--shard-size", type=int, default=None, help="samples per shard, the unit of resuming "
                     "(default 1000)")
    job.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default 1: one "
                     "process per core via torchrun); part of the recipe")
    job.add_argument("--timeout", type=float, default=None, help="seconds a rank may go without finishing a batch, "
                     "and the collectives' timeout (default 600)")
    job.add_argument("--no-pack", action="store_true", help="leave the shards; blitzdiff pack DIR assembles them")

    pack = commands.add_parser("pack", help="assemble a --out-dir folder's shards into one samples.npz (ADM layout)")
    pack.add_argument("folder", help="the folder blitzdiff sample --out-dir wrote")
    pack.add_argument("--out", default=None, help="the .npz to write (default FOLDER/samples.npz)")

    info = commands.add_parser("info", help="describe a checkpoint folder or file")
    info.add_argument("path", nargs="?", default=None, help=f"a checkpoint folder or file, an embedded model name "
                      f"(default {DEFAULT_MODEL}) or a random-weight preset")

    evaluate = commands.add_parser("eval", help="sample quality of an embedded digits model (Frechet distance in the "
                                   "feature space of a digits classifier; class accuracy)")
    _add_model_options(evaluate, many=True)
    evaluate.add_argument("--steps", type=int, nargs="+", default=[20], help="sampling steps, one evaluation per "
                          "count and model (default 20)")
    evaluate.add_argument("-n", type=int, default=300, help="samples per evaluation")
    evaluate.add_argument("--json", help="also write the figures to this JSON file")
    evaluate.add_argument("--plot", help="also write a PNG of FD against network evaluations (NFE), a line per model")
    evaluate.add_argument("--sheet", help="also write a PNG of samples: a row per model and step count")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = commands.add_parser("bench", help="throughput, latency, per-step split, build time and peak memory of "
                                "blitzdiff's runtime modes and of diffusers on the same checkpoint and sampler")
    _add_model_options(bench)
    bench.add_argument("--dtype", default="float32", help="the network's dtype: float32 (default), float16, bfloat16")
    bench.add_argument("--modes", nargs="+", help="runtime modes: eager compile compile-loop step graph onnxruntime "
                       "tensorrt (default eager compile graph; step, graph and tensorrt need CUDA: skipped elsewhere "
                       "unless named, then an error)")
    bench.add_argument("--batches", type=int, nargs="+", help="throughput batch sizes (default 1 4 16)")
    bench.add_argument("--steps", type=int, nargs="+", help="latency step counts (default 1 2 4 8 20 50)")
    bench.add_argument("--throughput-steps", type=int, help="step count of the throughput runs (default 20)")
    bench.add_argument("--latency-batch", type=int, help="batch size of the latency runs (default 1)")
    bench.add_argument("--repeats", type=int, help="timed runs per configuration: median, min, max and IQR reported, "
                       "a warning when they disagree (default 5)")
    bench.add_argument("--baseline", nargs="+", help="diffusers, diffusers-compile (default both), "
                       "diffusers-channels-last, diffusers-compile-channels-last (its weights channels-last), or none")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: the usable cores minus the rounded "
                       "load average, at least 1, at most torch's default; recorded in the JSON)")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="blitzdiff modes with the network's weights channels-last, or contiguous with "
                       "--no-channels-last (blitzdiff.load(channels_last=...)); default: the device's (channels-last "
                       "on the CPU). Baselines keep diffusers' contiguous weights (channels-last: the "
                       "diffusers-*-channels-last baselines)")
    bench.add_argument("--kernels", choices=ALL_BACKENDS, default=None,
                       help="blitzdiff modes with the network's kernels on this backend (Pipeline.compile(kernels="
                       "...)); default: the model's own, ref")
    bench.add_argument("--no-control", action="store_true", help="do not measure blitzdiff-eager again after the "
                       "other systems (the control: how far two measurements of one system differ in this run)")
    bench.add_argument("--interleave", action="store_true", help="after the sweeps, time every system again, one "
                       "call each per round in rotating order (--repeats rounds per batch and step count), and give "
                       "speed-ups from calls made seconds apart; every system stays in memory until the end")
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.add_argument("--plots", help="write latency-vs-steps and throughput-vs-batch PNGs into this folder")
    bench.add_argument("--quick", action="store_true", help="CI-sized smoke run: batches 1 2, steps 1 2, throughput "
                       "at 2 steps, 3 repeats, modes eager graph, baseline diffusers (options given still apply)")

    serve = commands.add_parser("serve", help="serve the model over HTTP with dynamic batching (POST /v1/sample, "
                                "/healthz, /readyz, /metrics; needs the serve extra)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--mode", choices=["eager", "compile", "step", "graph", "onnxruntime", "tensorrt"], default=None,
                       help="the pipeline's runtime (default: graph on CUDA, else eager)")
    serve.add_argument("--max-batch", type=int, default=16, help="rows per batch, also the fixed bucket (default 16)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for batch-mates "
                       "(default 5)")
    serve.add_argument("--max-queue", type=int, default=256, help="queued requests before 503 (default 256)")
    serve.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (504; default 60)")

    export = commands.add_parser("export", help="export the network, its VAE decoder or the whole fixed-step "
                                 "sampling loop to ONNX (model.onnx + export.json)")
    _add_model_options(export)
    export.add_argument("--out", required=True, help="the folder to write (must not exist unless --overwrite)")
    export.add_argument("--what", choices=["denoiser", "loop", "vae"], default="denoiser",
                        help="denoiser (default): the network; loop: the whole --steps run of --sampler, guided "
                        "when the guidance scale is not 1; vae: the VAE decoder")
    export.add_argument("--steps", type=int, help="loop: the number of sampling steps (unrolled in the graph)")
    export.add_argument("--batch", type=int, nargs=2, metavar=("MIN", "MAX"), default=[1, 64],
                        help="the range of the dynamic batch dimension (default 1 64)")
    export.add_argument("--dtype", default="float32", help="the network's dtype in the graph: float32 (default) or "
                        "float16 (GroupNorm / LayerNorm, the attention softmax and the timestep embedding stay "
                        "float32)")
    export.add_argument("--height", type=int, nargs=2, metavar=("MIN", "MAX"), help="a UNet denoiser's dynamic "
                        "image height range in pixels, as pipe.sample(height=...) counts them (default: fixed at the "
                        "model's sample size)")
    export.add_argument("--width", type=int, nargs=2, metavar=("MIN", "MAX"), help="the same for the width")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; 18..23)")
    export.add_argument("--external-data", action="store_true", help="weights in a separate file (default: when "
                        "they exceed 1 GiB)")
    export.add_argument("--no-optimize", action="store_true", help="skip the ONNX optimizer: a loop exports about 3x "
                        "faster, into a larger graph that runs slower")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--engine", choices=["tensorrt"], help="also build a TensorRT engine from the export into "
                        "OUT/tensorrt (needs the tensorrt extra and an NVIDIA GPU; denoiser and vae exports)")
    export.add_argument("--precision", default="fp32", help="engine precision: fp32 (default, TF32 off), tf32, fp16 "
                        "or bf16")
    export.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="engine batch sizes, one "
                        "optimization profile each; a denoiser also gets 2 x each (guided calls), all inside --batch "
                        "(default 1 2 4 8 16 32)")
    export.add_argument("--timing-cache", help="TensorRT timing cache file, read and updated (default: inside the "
                        "engine folder)")

    distill = commands.add_parser("distill", help="train a few-step student from a teacher (progressive "
                                  "distillation) into a pipeline folder")
    methods = distill.add_subparsers(dest="method", required=True)
    progressive = methods.add_parser("progressive", help="Salimans & Ho 2022: halve the step count each round, "
                                     "down to --steps-to DDIM steps (v-prediction student)")
    _add_distill_options(progressive, "AdamW iterations per round", "student and teacher")
    progressive.add_argument("--steps-from", type=int, default=None, help="the teacher's step count, steps-to x 2**k "
                             "(default: what a distilled teacher records, else 64)")
    progressive.add_argument("--steps-to", type=int, default=1, help="the student's step count (default 1)")
    cd = methods.add_parser("consistency", help="Song et al. 2023 / latent consistency models: a student the lcm "
                            "sampler runs at 1-8 steps")
    _add_distill_options(cd, "AdamW iterations", "the student at 1, 2 and 4 lcm steps and the teacher")
    cd.add_argument("--ema-decay", type=float, default=0.95, help="the target network's EMA rate (default 0.95)")
    cd.add_argument("--loss", choices=["huber", "l2"], default="huber", help="pseudo-Huber (default) or squared error")
    cd.add_argument("--original-steps", type=int, default=50, help="points of the skipped schedule, dividing the "
                    "training timesteps (LCM's original_inference_steps; default 50)")

    prof = commands.add_parser("profile", help="profile one sampling run: a torch.profiler trace (Chrome / Perfetto "
                               "JSON), network / solver / host time per step, and the ops of each step")
    _add_model_options(prof)
    prof.add_argument("--steps", type=int, default=20)
    prof.add_argument("-n", type=int, default=1, help="number of samples (the batch; default 1)")
    prof.add_argument("--dtype", default="float32", help="the network's dtype: float32 (default), float16, bfloat16")
    prof.add_argument("--trace", default="blitzdiff-trace.json",
                      help="Chrome / Perfetto trace file to write (default blitzdiff-trace.json)")
    prof.add_argument("--top", type=int, default=20, help="ops per table (default 20)")
    prof.add_argument("--per-step", action="store_true", help="also an op table for each step")
    prof.add_argument("--json", help="also write the figures to this JSON file")
    prof.add_argument("--threads", type=int, help="torch CPU threads (default: as `blitzdiff bench`, the usable cores "
                      "minus the rounded load average, at least 1, at most torch's default)")
    return parser


COMMANDS = {"sample": run_sample, "pack": run_pack, "info": run_info, "eval": run_eval, "profile": run_profile,
            "bench": run_bench, "export": run_export, "distill": run_distill, "serve": run_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tune_malloc_once()  # this process samples: keep its freed activations for the next step (blitzdiff.malloc)
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        rank = f" (rank {os.environ['RANK']})" if os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ \
            else ""
        print(f"blitzdiff {args.command}{rank}: error: {error}", file=sys.stderr)
        return 2
    return 0
