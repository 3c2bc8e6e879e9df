"""Per-sample Gaussian noise on CPU: the PyTorch spec vs the one-pass C++ kernel vs torch.randn, float32.

    python benchmarks/bench_gaussian_noise.py [--repeats 50] [--threads N] [--quick]

Rows: "ref" (blitzdiff::gaussian_noise, backend="ref": the spec's ~40 int64 tensor ops, eager), "ref compiled"
(the spec under torch.compile, as a compiled sampler runs it: Inductor fuses it into one vectorized loop, within
a few ulp of eager), "op cpu" (the same op, backend="cpu": dispatcher, Python wrapper and the C++
kernel), "_C kernel" (blitzdiff._C on a preallocated buffer: the kernel and the pybind11 call only) and "randn"
(torch.randn: a stateful generator, not per-sample, the speed to beat). Each figure is the median over `repeats`
timed blocks, each block as many calls as fill about 2 ms, after warm-up. Mnormal/s counts normals produced per second.
"""

import argparse

import torch
from _timing import QUICK_HELP, cpu_threads, device_name, median_us  # benchmarks/ is on sys.path when run as a script

from blitzdiff import _C
from blitzdiff.kernels import gaussian_noise, gaussian_noise_ref

SHAPES = [(1, 3, 32, 32), (1, 4, 64, 64), (8, 4, 64, 64)]  # a CIFAR image, one SD latent, a batch of SD latents
QUICK_SHAPES = [(2, 3, 8, 8)]
STREAM = 3


def variants(shape, compile_ref: bool) -> dict:
    """name -> zero-argument callable drawing float32 noise [batch, *rest] for seeds 0 .. batch-1."""
    batch, *rest = shape
    seeds = torch.arange(batch)
    out = torch.empty(shape)
    count = out[0].numel()

    def kernel():  # returns `out` so the closure keeps the tensors behind the raw pointers alive
        _C.gaussian_noise_cpu(out.data_ptr(), seeds.data_ptr(), batch, count, STREAM, "float32",
                              torch.get_num_threads())
        return out

    rows = {"ref": lambda: gaussian_noise(seeds, STREAM, rest, torch.float32, backend="ref")}
    if compile_ref:
        compiled_ref = torch.compile(gaussian_noise_ref, fullgraph=True, dynamic=False)
        rows["ref compiled"] = lambda: compiled_ref(seeds, STREAM, rest, torch.float32)
    return rows | {
        "op cpu": lambda: gaussian_noise(seeds, STREAM, rest, torch.float32, backend="cpu"),
        "_C kernel": kernel,
        "randn": lambda: torch.randn(shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    with cpu_threads(args.threads):
        print(f"device: {device_name(torch.device('cpu'))}, torch {torch.__version__}")
        print(f"{'shape':>12} {'variant':>12} {'us/call':>10} {'Mnormal/s':>10} {'ref/this':>9}")
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            normals = torch.Size(shape).numel()
            ref_us = None
            for name, run in variants(shape, compile_ref=not args.quick).items():
                us = median_us(run, args.repeats)
                ref_us = ref_us or us  # "ref" runs first
                row = f"{'x'.join(map(str, shape)):>12} {name:>12} {us:10.1f} {normals / us:10.1f}"
                print(f"{row} {ref_us / us:9.1f}")


if __name__ == "__main__":
    main()
