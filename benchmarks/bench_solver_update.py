"""The fused solver update on CPU vs PyTorch eager `a*x + b*d0 + c*d1 + s*noise`, float32, same tensors.

    python benchmarks/bench_solver_update.py [--repeats 300] [--inner 20] [--threads N] [--quick]

Rows: "eager" (seven PyTorch ops), "op cpu" (blitzdiff::solver_update, backend="cpu": the dispatcher, the Python
wrapper and the kernel) and "_C kernel" (blitzdiff._C.solver_update_cpu on preallocated buffers: the kernel and
the pybind11 call only). Each figure is the median over `repeats` timed blocks of `inner` calls, after warm-up;
GB/s counts the compulsory traffic (4 tensors read, 1 written).
"""

import argparse

import torch
from _timing import QUICK_HELP, cpu_threads, device_name, median_us  # benchmarks/ is on sys.path when run as a script

from blitzdiff import _C
from blitzdiff.kernels import solver_update

SHAPES = [(1, 4, 64, 64), (16, 3, 32, 32)]  # one SD latent; a CIFAR-sized pixel batch
QUICK_SHAPES = [(1, 4, 8, 8)]
A, B, C, S = 0.9, -0.35, 0.12, 0.05


def variants(shape) -> dict:
    """name -> zero-argument callable doing one update of fresh float32 tensors of `shape`."""
    x, d0, d1, noise = (torch.randn(shape) for _ in range(4))
    out = torch.empty_like(x)
    raw = (out.data_ptr(), x.data_ptr(), d0.data_ptr(), d1.data_ptr(), noise.data_ptr(), x.numel(), "float32")

    def kernel():  # returns `out` so the closure keeps the tensors behind the raw pointers alive
        _C.solver_update_cpu(*raw, A, B, C, S)
        return out

    return {
        "eager": lambda: A * x + B * d0 + C * d1 + S * noise,
        "op cpu": lambda: solver_update(x, d0, d1, noise, A, B, C, S, backend="cpu"),
        "_C kernel": kernel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.inner = 3, 2
    with cpu_threads(args.threads):
        print(f"device: {device_name(torch.device('cpu'))}, torch {torch.__version__}")
        print(f"{'shape':>16} {'variant':>10} {'us/call':>9} {'GB/s':>7} {'eager/this':>10}")
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            gigabytes = 5 * torch.Size(shape).numel() * 4 / 1e9  # float32: 4 reads + 1 write per element
            eager_us = None
            for name, run in variants(shape).items():
                us = median_us(run, args.repeats, args.inner)
                eager_us = eager_us or us  # "eager" runs first
                row = f"{'x'.join(map(str, shape)):>16} {name:>10} {us:9.2f} {gigabytes / us * 1e6:7.1f}"
                print(f"{row} {eager_us / us:10.2f}")


if __name__ == "__main__":
    main()
