"""Two checkouts of blitzdiff's Python code timed against each other in fresh processes, alternating per round
(separate runs on this project's shared CPU drift more than a few-percent change being measured).

    git worktree add /tmp/before <revision>
    python benchmarks/ab_checkouts.py /tmp/before . [--cases unet-digits:1 dit-digits:8 FOLDER:8] [--rounds 4]
                                      [--runs 30] [--threads 2] [--json out.json]

Each process imports blitzdiff from its checkout (the editable install's import hook is bypassed), loads the model
with blitzdiff.load, samples 3 warm-up runs, then times `runs` 10-step DPM-Solver++(2M) runs (batch as given,
guided at the model's default scale) and prints their median. A checkout without a built blitzdiff._C uses the
installed one: for changes to the Python code only (`python benchmarks/in_checkout.py CHECKOUT --build` builds one
into a checkout, for changes to the C++ kernels). Prints per case each side's medians per round and the median
of the per-round ratios B / A with their range.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)  # for the child's `import _timing` and in_checkout.use
CHILD = """
import json, sys
from pathlib import Path
here, checkout, model = sys.argv[1:4]
batch, runs, threads = (int(a) for a in sys.argv[4:7])
extension = sys.argv[7:]
sys.path.insert(0, here)
from in_checkout import use
use(Path(checkout), extension[0] if extension else None)  # the installed build where the checkout has none
import torch, blitzdiff
from _timing import median_seconds
from blitzdiff.bench import sample_inputs
torch.set_num_threads(threads)
pipe = blitzdiff.load(model)
inputs = sample_inputs(pipe, batch, pipe.default_guidance_scale)
def run():
    pipe.sample(batch, steps=10, sampler="dpmpp_2m", output_type="raw", progress=False, **inputs)
for _ in range(2):
    run()
print(json.dumps({"ms": median_seconds(run, runs) * 1e3}))  # after its own warm-up run
"""


def installed_extension() -> Path | None:
    spec = importlib.util.find_spec("blitzdiff._C")
    return None if spec is None or spec.origin is None else Path(spec.origin)


def time_once(checkout: Path, model: str, batch: int, runs: int, threads: int, extension: Path | None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    argv = [HERE, str(checkout), model, str(batch), str(runs), str(threads), *([str(extension)] if extension else [])]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="checkout A (the baseline)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--cases", nargs="+", default=["unet-digits:1", "unet-digits:8", "dit-digits:1",
                                                       "dit-digits:8"], help="MODEL:BATCH (a name or a folder)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    checkouts = [args.a.resolve(), args.b.resolve()]
    extension = installed_extension()
    load_before = os.getloadavg()
    found = {case: {"a": [], "b": []} for case in args.cases}
    for r in range(args.rounds):
        for case in args.cases:
            model, batch = case.rsplit(":", 1)
            for side in ("ab" if r % 2 == 0 else "ba"):
                checkout = checkouts[0 if side == "a" else 1]
                found[case][side].append(round(time_once(checkout, model, int(batch), args.runs, args.threads,
                                                         extension), 2))
    summary = {}
    for case, sides in found.items():
        ratios = sorted(b / a for a, b in zip(sides["a"], sides["b"], strict=True))
        summary[case] = {"a_ms": sides["a"], "b_ms": sides["b"], "b_over_a": round(statistics.median(ratios), 3),
                         "range": [round(ratios[0], 3), round(ratios[-1], 3)]}
        print(f"{case}: A {sides['a']} ms, B {sides['b']} ms; B / A {summary[case]['b_over_a']} "
              f"[{summary[case]['range'][0]}-{summary[case]['range'][1]}]")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": str(checkouts[0]), "b": str(checkouts[1]), "threads": args.threads, "runs": args.runs,
                       "torch": torch.__version__, "load_before": load_before, "load_after": load_after,
                       "cases": summary}, f, indent=1)


if __name__ == "__main__":
    main()
