"""The `blitzdiff` command: `sample`, `pack`, `info`, `eval`, `bench`, `profile`, `export`, `distill`, `serve`. Errors
print one line (naming the rank in a torchrun job), exit status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .engine.config import SAMPLERS
from .engine.loading import DEFAULT_MODEL, EMBEDDED
from .kernels._backends import ALL_BACKENDS
from .models import PRESETS

MIN_TILE = 64  # pixels: tiny images (the embedded models are 16x16) are enlarged in the grid, nearest-neighbour
GAP = 2  # pixels of mid-grey between the grid's tiles
GAP_VALUE = 128


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
    bench.add_argument("--channels-last", action="store_true", help="blitzdiff modes with the network's weights "
                       "channels-last (Pipeline.compile(channels_last=True)); baselines as loaded (diffusers' own: "
                       "the diffusers-*-channels-last baselines)")
    bench.add_argument("--kernels", choices=ALL_BACKENDS, default=None,
                       help="blitzdiff modes with the network's kernels on this backend (Pipeline.compile(kernels="
                       "...)); default: the model's own, ref")
    bench.add_argument("--no-control", action="store_true", help="do not measure blitzdiff-eager again after the "
                       "other systems (the control: how far two measurements of one system differ in this run)")
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


def _labels(pipe, n: int, classes: Sequence[int] | None) -> list[int] | None:
    if not pipe.kind.class_conditional:
        return list(classes) if classes else None
    cycle = list(classes) if classes else list(range(pipe.num_classes))
    return [cycle[i % len(cycle)] for i in range(n)]


def grid(images: list) -> object:
    """PIL images of one size -> one PIL image, ceil(sqrt(n)) columns, tiles enlarged to at least MIN_TILE px and
    GAP px apart (mid-grey)."""
    from PIL import Image

    width, height = images[0].size
    zoom = max(1, math.ceil(MIN_TILE / max(width, height)))
    tile_w, tile_h = width * zoom, height * zoom
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    size = (columns * tile_w + (columns - 1) * GAP, rows * tile_h + (rows - 1) * GAP)
    sheet = Image.new(images[0].mode, size, (GAP_VALUE,) * len(images[0].getbands()))
    for i, image in enumerate(images):
        tile = image.resize((tile_w, tile_h), Image.NEAREST)
        sheet.paste(tile, ((i % columns) * (tile_w + GAP), (i // columns) * (tile_h + GAP)))
    return sheet


def check_writable(option: str, path: str, suffix: str | None = None) -> None:
    """Refuse an output file that cannot be written (a folder, a missing one, another format than `suffix`'s), before
    any work."""
    output = Path(path)
    if output.is_dir() or (suffix is not None and output.suffix.lower() != suffix):
        raise ValueError(f"{option} {path}: give a file name" + (f" ending in {suffix} (the format written)"
                                                                 if suffix is not None else ""))
    folder = output.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: folder {folder} is not writable")


JOB_OPTIONS = {"fmt": ("--format", "npz"), "batch": ("--batch", 64), "shard_size": ("--shard-size", 1000),
               "threads": ("--threads", 1), "timeout": ("--timeout", 600.0), "no_pack": ("--no-pack", False)}


def run_sample(args) -> None:
    import blitzdiff
    from blitzdiff.bench.measure import timed_ms
    from blitzdiff.profiling import prompt_embeddings

    given = [option for name, (option, _) in JOB_OPTIONS.items() if getattr(args, name) not in (None, False)]
    if args.out_dir is not None:
        if args.output is not None:
            raise ValueError("--output writes a grid, --out-dir a sample folder: give one")
        return run_sample_job(args)
    if given:
        raise ValueError(f"{', '.join(given)} only go with --out-dir (sharded output)")
    args.output = args.output or "samples.png"
    check_writable("--output", args.output, ".png")
    pipe = blitzdiff.load(args.model, device=args.device, dtype=args.dtype)
    labels = _labels(pipe, args.n, args.classes)
    guidance = pipe.default_guidance_scale if args.guidance is None else args.guidance
    kwargs = dict(steps=args.steps, sampler=args.sampler, seeds=args.seed, class_labels=labels,
                  guidance_scale=guidance, progress=not args.no_progress,
                  **prompt_embeddings(pipe, args.n, guidance))  # random stand-ins for a text-conditional UNet

    result = {}

    def sample() -> None:
        result["raw"] = pipe.sample(args.n, output_type="raw", **kwargs)

    note = "first call, includes warm-up"
    if args.mode is not None:
        pipe.compile(args.mode)
        build_s = timed_ms(sample, pipe.device) / 1e3
        note = f"mode {args.mode}, second call; the first, with the build, took {build_s:.2f} s"
        network = pipe.runtime_stats().get("network")  # an external runtime: exported and loaded by compile()
        if network is not None:
            note += f", after {network['load_s']:.2f} s of export and load"
    elapsed = timed_ms(sample, pipe.device) / 1e3
    raw = result["raw"]
    images = blitzdiff.engine.pipeline.to_pil(pipe.decode(raw).permute(0, 2, 3, 1).cpu().numpy())
    grid(images).save(args.output, format="PNG")
    notes = [f"guidance {guidance:g}"]
    if pipe.kind.text_conditional:
        notes.append("random stand-in prompt embeddings")
    if pipe.vae is None and pipe.model.config["in_channels"] == 4:
        notes.append("the PNG shows the raw latents: no VAE")
    print(f"{pipe.name}: {args.n} samples, {args.steps} steps of {args.sampler or pipe.sampler_name} on {args.device} "
          f"({args.dtype}, {', '.join(notes)}): {elapsed / args.steps * 1e3:.2f} ms/step, {args.n / elapsed:.1f} "
          f"images/s ({note}) -> {args.output}")


def run_sample_job(args) -> None:
    """`sample --out-dir`: this process's share of a (torchrun) job; rank 0 prints the summary."""
    import torch

    import blitzdiff
    from blitzdiff.batch_sampling import JobRefused, join, rank_device, sample_to_folder

    for name, (_, default) in JOB_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    device = rank_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    pipe = blitzdiff.load(args.model, device=device, dtype=args.dtype)
    world = join(device.type, args.timeout)
    together = False
    try:
        summary = sample_to_folder(pipe, args.out_dir, args.n, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                   classes=args.classes, guidance_scale=args.guidance, batch=args.batch,
                                   shard_size=args.shard_size, fmt=args.fmt, mode=args.mode, timeout_s=args.timeout,
                                   pack=not args.no_pack, progress=not args.no_progress, world=world)
        if world.rank == 0:
            print(summary)
        together = True
    except JobRefused:
        together = True  # refused alike on every rank
        raise
    finally:
        world.close(together)


def run_pack(args) -> None:
    from blitzdiff.batch_sampling import pack

    print(f"-> {pack(args.folder, args.out)}")


def run_info(args) -> None:
    from blitzdiff.engine.loading import info

    print(json.dumps(info(args.path), indent=2, default=str))


def run_eval(args) -> None:
    from tqdm.auto import tqdm

    import blitzdiff
    from blitzdiff import eval_report

    for option, path, suffix in (("--json", args.json, None), ("--plot", args.plot, ".png"),
                                 ("--sheet", args.sheet, ".png")):
        if path:
            check_writable(option, path, suffix)
    specs = [eval_report.model_spec(text, _names_a_model) for text in args.model]
    runs = [(blitzdiff.load(spec.model, device=args.device), spec.sampler or args.sampler, spec.steps or args.steps)
            for spec in specs]
    total = sum(pipe.evaluations(steps, sampler) for pipe, sampler, counts in runs for steps in counts)
    bar = tqdm(total=total, desc="eval", unit="eval", leave=True, disable=args.no_progress)
    rows, images = [], []
    with bar:
        for pipe, sampler, counts in runs:
            guidance = pipe.default_guidance_scale if args.guidance is None else args.guidance
            for steps in counts:
                row, samples = eval_report.evaluate(pipe, steps, args.n, sampler, guidance, _labels(pipe, args.n, None),
                                                    lambda: bar.update(1))
                rows.append(row)
                images.append(samples)
                shown = ", ".join(f"{k} {row[k]:.3f}" for k in ("fd", "accuracy") if k in row)
                bar.write(f"{pipe.name} {row['sampler']} {steps} steps (NFE {row['nfe']}), guidance "
                          f"{row['guidance']:g}: {shown}")
    if len(rows) > 1:
        print(eval_report.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        eval_report.plot_fd_against_nfe(rows, args.plot)
    if args.sheet:
        eval_report.sample_sheet(rows, images, args.sheet)


def _names_a_model(text: str) -> bool:
    return text in EMBEDDED or text in PRESETS or os.path.exists(text)


def run_bench(args) -> None:
    from blitzdiff import bench

    config = bench.bench_config(
        quick=args.quick, model=args.model, sampler=args.sampler, device=args.device, dtype=args.dtype,
        modes=args.modes, batches=args.batches, steps=args.steps, throughput_steps=args.throughput_steps,
        latency_batch=args.latency_batch, guidance=args.guidance, repeats=args.repeats, baseline=args.baseline,
        threads=args.threads, channels_last=args.channels_last, kernels=args.kernels, control=not args.no_control)
    results = bench.run_bench(config)
    print("\n" + bench.format_results(results))
    if args.json:
        bench.write_json(results, args.json)
        print(f"results -> {args.json}")
    if args.plots:
        print("plots -> " + ", ".join(str(path) for path in bench.write_plots(results, args.plots)))


def run_profile(args) -> None:
    import torch

    import blitzdiff
    from blitzdiff import profiling
    from blitzdiff.bench import CpuThreads, format_warnings

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    with CpuThreads(args.threads) as threads:
        pipe = blitzdiff.load(args.model, device=args.device, dtype=args.dtype)
        guidance = pipe.default_guidance_scale if args.guidance is None else args.guidance
        conditioning = dict(class_labels=_labels(pipe, args.n, None),
                            **profiling.prompt_embeddings(pipe, args.n, guidance))
        result = profiling.profile_sampling(pipe, args.n, steps=args.steps, sampler=args.sampler,
                                            trace_path=args.trace, guidance_scale=guidance, **conditioning)
    run = {"model": pipe.name, "sampler": args.sampler or pipe.sampler_name, "steps": args.steps, "n": args.n,
           "dtype": args.dtype, "guidance": guidance, "torch": torch.__version__, "threads": threads.record(),
           "warnings": threads.warnings()}
    print(f"{run['model']}: {args.n} samples, {args.steps} steps of {run['sampler']} on {args.device} ({args.dtype}); "
          f"one profiled run after warm-up\n{threads.describe()}")
    print(profiling.format_report(result, args.top, args.per_step))
    print(f"trace -> {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
    if run["warnings"]:
        print(format_warnings(run["warnings"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**run, **result.to_dict()}, f, indent=2)


def run_serve(args) -> None:
    import blitzdiff
    from blitzdiff.serving.server import serve

    if args.guidance is not None or args.sampler is not None:
        raise ValueError("serve takes --guidance and --sampler per request (JSON fields guidance_scale, sampler)")
    serve(blitzdiff.load(args.model, device=args.device), host=args.host, port=args.port, mode=args.mode,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout)


def run_export(args) -> None:
    import blitzdiff
    from blitzdiff.export import export_onnx, read_manifest

    if args.engine is not None:  # fail before a long export: the engine's options, then the package
        from blitzdiff.export.trt_engine import PRECISIONS, WHATS, require_tensorrt

        if args.what not in WHATS:
            raise ValueError(f"--engine tensorrt builds engines of {' and '.join(WHATS)} exports, not --what "
                             f"{args.what}")
        if args.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {args.precision!r}; allowed: {', '.join(PRECISIONS)}")
        require_tensorrt()
    pipe = blitzdiff.load(args.model, device=args.device, dtype=args.dtype)
    size = None
    if args.height is not None or args.width is not None:  # image pixels -> the graph's latent pixels
        height, width = args.height or (None, None), args.width or (None, None)
        _, *low = pipe.latent_shape(height[0], width[0])
        _, *high = pipe.latent_shape(height[1], width[1])
        size = tuple(zip(low, high, strict=True))
    folder = export_onnx(pipe, args.out, what=args.what, sampler=args.sampler, steps=args.steps,
                         guidance_scale=args.guidance, batch=tuple(args.batch), dtype=args.dtype, size=size,
                         opset=args.opset, external_data=args.external_data or None, optimize=not args.no_optimize,
                         overwrite=args.overwrite)
    manifest = read_manifest(folder)
    inputs = ", ".join(f"{spec['name']} {spec['dtype']}{spec['shape']}" for spec in manifest["inputs"])
    loop = manifest.get("loop")
    what = (f"loop of {loop['sampler']}, {loop['steps']} steps, {loop['evaluations']} evaluations, "
            f"{'guided' if loop['guided'] else 'unguided'}" if loop else args.what)
    files = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"{pipe.name}: {what} -> {folder} ({files / 2**20:.1f} MiB, {manifest['precision']['dtype']}, opset "
          f"{manifest['opset']}, batch {manifest['batch'][0]}..{manifest['batch'][1]}); inputs: {inputs}")
    if args.engine is not None:
        from blitzdiff.export.trt_engine import build_engine, read_record

        guided = 2 if args.what == "denoiser" else 1  # pipe.compile("tensorrt") runs [uncond; cond] in one call
        batches = sorted({b * k for b in args.buckets for k in range(1, guided + 1)})
        engine = build_engine(folder, folder / "tensorrt", buckets=batches, precision=args.precision,
                              timing_cache=args.timing_cache, overwrite=args.overwrite)
        record = read_record(engine)
        print(f"TensorRT {record['tensorrt']} engine, {args.precision}, profiles {record['profiles']}, built in "
              f"{record['build_seconds']:.1f} s on {record['gpu']} -> {engine}")


def run_distill(args) -> None:
    import torch

    import blitzdiff
    from blitzdiff import distill, eval_report

    if args.json:
        check_writable("--json", args.json)
    teacher = blitzdiff.load(args.teacher)
    start = time.perf_counter()
    common = {"batch": args.batch, "lr": args.lr, "guidance": args.guidance, "data": args.data, "seed": args.seed,
              "resume": args.resume, "checkpoint_every": args.checkpoint_every, "progress": not args.no_progress}
    if args.method == "progressive":
        folder = distill.progressive(teacher, args.out, steps_from=args.steps_from, steps_to=args.steps_to,
                                     iters_per_round=args.iters, **common)
        sampled = f"{args.steps_to} steps, ddim"
    else:
        folder = distill.consistency(teacher, args.out, iters=args.iters, ema_decay=args.ema_decay, loss=args.loss,
                                     original_steps=args.original_steps, **common)
        sampled = "lcm, 1-8 steps"
    seconds = time.perf_counter() - start
    print(f"student ({sampled}) -> {folder} (trained in {seconds:.0f} s)")
    rows = []
    if args.eval > 0 and args.data is None and teacher.latent_shape(None, None) == (1, 16, 16):
        rows = _distill_table(teacher, folder, args)
        print(eval_report.format_table(rows))
    if args.json:
        record = {"command": "blitzdiff " + " ".join(sys.argv[1:]), "teacher": teacher.name, "out": str(folder),
                  "train_seconds": seconds, "torch_threads": torch.get_num_threads(), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


def _distill_table(teacher, folder, args) -> list[dict]:
    """The student against the teacher, same seeds and labels: progressive at its step count against the teacher at
    that and at its own; consistency at 1, 2 and 4 lcm steps against the teacher's ddim at 4 and 50."""
    import blitzdiff
    from blitzdiff import eval_report
    from blitzdiff.distill.progressive_distillation import DEFAULT_STEPS_FROM, DISTILLED_STEPS_FIELD

    student = blitzdiff.load(folder)
    guidance = 1.0 if args.guidance is None else args.guidance
    if args.method == "progressive":
        steps_from = args.steps_from or int(teacher.scheduler_config.get(DISTILLED_STEPS_FIELD, DEFAULT_STEPS_FROM))
        runs = [(student, "ddim", args.steps_to, 1.0)] + [(teacher, "ddim", steps, guidance)
                                                           for steps in (args.steps_to, steps_from)]
    else:  # the student at 1, 2, 4 lcm steps; the teacher at 4 and 50 ddim steps
        runs = [(student, "lcm", steps, 1.0) for steps in (1, 2, 4)] + [(teacher, "ddim", steps, guidance)
                                                                          for steps in (4, 50)]
    return [eval_report.evaluate(pipe, steps, args.eval, sampler, scale, _labels(pipe, args.eval, None),
                                 lambda: None)[0] for pipe, sampler, steps, scale in runs]


COMMANDS = {"sample": run_sample, "pack": run_pack, "info": run_info, "eval": run_eval, "profile": run_profile,
            "bench": run_bench, "export": run_export, "distill": run_distill, "serve": run_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        rank = f" (rank {os.environ['RANK']})" if os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ \
            else ""
        print(f"blitzdiff {args.command}{rank}: error: {error}", file=sys.stderr)
        return 2
    return 0
