"""What the kernel benchmarks share: the command line, the kernel rows, the timed table rows.

Importing it also puts benchmarks/ on sys.path, for benchmarks/_timing.py (the benchmarks are scripts, run as
`python benchmarks/kernels/bench_<op>.py`).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _timing
from _timing import QUICK_HELP, time_us  # noqa: E402


def parse_args(doc: str, dtypes: list[str], gpu_dtype: str, dtype_help: str = "") -> tuple:
    """(args, device, dtype) from the command line of a kernel benchmark (run its body in _timing.cpu_threads(
    args.threads)). The dtype defaults to `gpu_dtype` on a GPU and float32 on CPU; --quick means 3 repeats and no
    compile rows (the script picks its tiny sizes)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=dtypes,
                        help=f"{dtype_help}default {gpu_dtype} on a GPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to build)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.no_compile = 3, True
    device = torch.device(args.device)
    return args, device, getattr(torch, args.dtype or ("float32" if device.type == "cpu" else gpu_dtype))


def kernel_rows(call, device: torch.device, dtype: torch.dtype, kernel_dtypes: dict) -> dict:
    """backend -> zero-argument callable `call(backend)`, for each kernel backend built for `device` and `dtype`."""
    found = {}
    for backend in ("cpu",) if device.type == "cpu" else ("cuda", "triton"):
        if dtype not in kernel_dtypes[backend]:
            continue
        try:
            call(backend)  # also compiles / loads it outside the timing
        except (RuntimeError, ImportError) as e:  # not built here, triton not installed
            print(f"  ({backend}: {e})")
            continue
        found[backend] = lambda backend=backend: call(backend)
    return found


def print_timed_rows(prefix: str, rows: dict, device: torch.device, repeats: int, nbytes: int) -> None:
    """Time each of `rows` (name -> zero-argument call, "eager" first) and print a line per row: `prefix`, the name,
    us/call, GB/s for `nbytes` of compulsory traffic, and eager's time over this row's."""
    eager_us = None
    for name, run in rows.items():
        us = time_us(run, device, repeats)
        eager_us = eager_us or us  # "eager" runs first
        print(f"{prefix} {name:>9} {us:9.1f} {nbytes / us / 1e3:7.1f} {eager_us / us:10.2f}")
