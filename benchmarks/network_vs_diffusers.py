"""One network forward, ours (each kernel backend) against diffusers' class on the same weights: time per forward
and where the device time goes (the top kernels, or on CPU the top ops, of one profiled forward).

    python benchmarks/network_vs_diffusers.py --model dit-xl-2-256 --batch 128 --dtype float16 --device cuda

Answers "why is diffusers faster on this network" without the sampling loop around it: the same inputs (noise
latents, timestep 500, class labels or random prompt embeddings) go to every system, the systems alternate round by
round, and each output is compared with diffusers' (largest difference over diffusers' largest value).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

import blitzdiff
from blitzdiff.bench.baseline import diffusers_model
from blitzdiff.bench.measure import synchronize, timed_ms
from blitzdiff.kernels._backends import ALL_BACKENDS
from blitzdiff.models import set_backend
from blitzdiff.profiling import prompt_embeddings


def network_inputs(pipe, batch: int) -> dict[str, torch.Tensor]:
    """Keyword inputs of one forward at `batch`: latents, timestep 500 and the model's conditioning."""
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn((batch, *pipe.latent_shape(None, None)), generator=generator),
              "timestep": torch.full((batch,), 500.0)}
    if pipe.kind.class_conditional:
        inputs["class_labels"] = torch.arange(batch) % pipe.num_classes
    inputs.update(prompt_embeddings(pipe, batch, 1.0, seed=1))
    return {name: t.to(pipe.device, pipe.dtype if t.is_floating_point() and name != "timestep" else t.dtype)
            for name, t in inputs.items()}


def top_device_time(forward, device: torch.device, top: int) -> tuple[float, list[tuple[str, int, float]]]:
    """(total ms, [(name, calls, ms)] of the `top` largest) over one profiled forward: CUDA kernels on a GPU, ops'
    self time on the CPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        forward()
        synchronize(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name][0] += 1
                totals[event.name][1] += event.time_range.elapsed_us() / 1e3
    else:
        for average in prof.key_averages():
            if average.key.startswith("aten::"):
                totals[average.key] = [average.count, average.self_cpu_time_total / 1e3]
    rows = sorted(((name, int(c), ms) for name, (c, ms) in totals.items()), key=lambda row: -row[2])
    return sum(ms for _, _, ms in rows), rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["ref", "auto"], choices=ALL_BACKENDS,
                        help="our kernel backends to run")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    pipe = blitzdiff.load(args.model, device=args.device, dtype=args.dtype)
    device = pipe.device
    inputs = network_inputs(pipe, args.batch)
    conditioning = {name: t for name, t in inputs.items() if name not in ("sample", "timestep")}
    systems = {"diffusers": diffusers_model(pipe.model)}
    systems.update({f"blitzdiff-{backend}": pipe.model for backend in args.backends})

    def forward(name: str):
        model = systems[name]
        if name.startswith("blitzdiff-"):
            set_backend(model, name.removeprefix("blitzdiff-"))
        out = model(inputs["sample"], inputs["timestep"], **conditioning)  # diffusers' DiT names x hidden_states
        return out.sample if hasattr(out, "sample") else out

    times: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, float] = {}
    with torch.inference_mode():
        expected = forward("diffusers").float()
        for name in list(systems):
            try:
                errors[name] = ((forward(name).float() - expected).abs().max() / expected.abs().max()).item()
            except Exception as err:  # a backend without a kernel for this model, dtype or device: left out
                print(f"{name}: left out, its forward failed: {type(err).__name__}: {str(err)[:300]}")
                del systems[name]
        for _ in range(args.rounds):  # alternated, so drift hits every system alike
            for name in systems:
                times[name].append(timed_ms(lambda name=name: forward(name), device))
        profiles = {name: top_device_time(lambda name=name: forward(name), device, args.top) for name in systems}

    record = {"model": args.model, "batch": args.batch, "dtype": args.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "systems": {}}
    print(f"{args.model} forward, batch {args.batch}, {args.dtype}, {record['device']}, torch {torch.__version__}")
    print(f"{'system':20} {'median ms':>10} {'min-max ms':>18} {'profiled ms':>12} {'error vs diffusers':>19}")
    for name in systems:
        total, rows = profiles[name]
        median = statistics.median(times[name])
        print(f"{name:20} {median:10.3f} {min(times[name]):8.3f}-{max(times[name]):<9.3f} {total:12.3f} "
              f"{errors[name]:19.2e}")
        record["systems"][name] = {"median_ms": median, "times_ms": times[name], "profiled_ms": total,
                                   "error": errors[name], "top": rows}
    for name in systems:
        total, rows = profiles[name]
        print(f"\n{name}: top {len(rows)} by {'device' if device.type == 'cuda' else 'self CPU'} time "
              f"(of {total:.3f} ms)")
        for kernel, calls, ms in rows:
            print(f"  {ms:9.3f} ms {calls:5d}x  {kernel[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
