"""What each `blitzdiff` command does, given its parsed arguments (blitzdiff.cli builds the parser and dispatches
here): sample, pack, info, eval, bench, profile, serve, export, distill."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .engine.loading import EMBEDDED
from .models import PRESETS

MIN_TILE = 64  # pixels: tiny images (the embedded models are 16x16) are enlarged in the grid, nearest-neighbour
GAP = 2  # pixels of mid-grey between the grid's tiles
GAP_VALUE = 128


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
        threads=args.threads, channels_last=args.channels_last, kernels=args.kernels, control=not args.no_control,
        interleave=args.interleave)
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
