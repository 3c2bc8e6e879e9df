"""Time each step of a model's CPU graph replay (blitzdiff.engine.cpu_graph), for finding where a replayed forward
spends its time: torch's profiler makes the graphs run eagerly, so this times the recorded steps themselves.

    python benchmarks/cpu_graph_steps.py [--model dit-digits] [--batch 8] [--threads 2] [--repeats 30]
    python benchmarks/in_checkout.py CHECKOUT benchmarks/cpu_graph_steps.py ...   # another checkout's code and build

Samples 3 warm-up runs (10-step DPM-Solver++(2M), guided at the model's default scale) to capture the graph, then
replays it `repeats` times timing each step with perf_counter_ns, in order (each step sees the caches the steps
before it left, as in a replay). Prints the whole replay's median, then per kind of step (the torch function or
kernel it calls) the count, the sum of the steps' medians and the median per call.
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

import blitzdiff


def step_name(step) -> str:
    """The function a replay step calls: the closure's torch function, out= form or kernel (a kernel object's method
    as Class.method: Conv2dNhwc.run runs the direct convolutions and models.linear's layers), "addmm" for a linear."""
    cells = dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__ or ()), strict=True))
    if "rows" in cells:  # cpu_graph._linear_step
        return "addmm" if "bias" in cells else "mm"
    target = cells.get("func") or cells.get("form") or cells.get("kernel")
    name = getattr(target, "__name__", None) or step.__code__.co_name
    owner = getattr(target, "__self__", None)
    kernel_object = owner is not None and type(owner).__module__ == "blitzdiff._C"  # not a module's function
    return f"{type(owner).__name__}.{name}" if kernel_object else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = blitzdiff.load(args.model)
    labels = {"class_labels": [i % 10 for i in range(args.batch)]} if pipe.kind.class_conditional else {}
    for _ in range(3):
        pipe.sample(args.batch, steps=10, sampler="dpmpp_2m", seeds=0, output_type="raw", progress=False, **labels)
    (graph,) = [g for g in pipe.cpu_graphs.graphs.values() if not isinstance(g, str)]
    with torch.inference_mode():  # the graph's buffers are inference tensors
        for _ in range(5):
            graph.replay({})
        per_step = [[] for _ in graph.steps]
        for _ in range(args.repeats):
            for i, step in enumerate(graph.steps):
                start = time.perf_counter_ns()
                step()
                per_step[i].append(time.perf_counter_ns() - start)
        whole = []
        for _ in range(args.repeats):
            start = time.perf_counter_ns()
            graph.replay({})
            whole.append(time.perf_counter_ns() - start)
    print(f"{args.model} batch {args.batch} ({len(graph.steps)} steps, {args.threads} threads): replay "
          f"{statistics.median(whole) / 1e6:.3f} ms")
    kinds = defaultdict(list)
    for step, times in zip(graph.steps, per_step, strict=True):
        kinds[step_name(step)].append(statistics.median(times) / 1e3)
    for name, medians in sorted(kinds.items(), key=lambda item: -sum(item[1])):
        total, each = sum(medians) / 1e3, statistics.median(medians)
        print(f"  {name:28s} {len(medians):4d}  {total:7.3f} ms  {each:8.1f} us a call")


if __name__ == "__main__":
    main()
