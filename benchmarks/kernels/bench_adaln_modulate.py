"""adaLN modulation and the gated residual: the kernels vs PyTorch eager and torch.compile of the specs.

    python benchmarks/kernels/bench_adaln_modulate.py [--device cpu|cuda] [--dtype float16] [--repeats 30]
        [--threads N] [--no-compile] [--quick]

DiT-XL/2 shapes (hidden 1152; 256 tokens at 256px, 1024 at 512px; batch 8, the CFG batch of 4 images) on a GPU;
on CPU the scaled-down [2, 256, 384] and [2, 256, 1152] (float32). shift / scale / gate are chunks of one [B, 6D]
modulation vector, as in a DiT block. Rows: "eager" (the spec's torch ops: F.layer_norm, then scale and shift;
DiT's `x + gate[:, None] * y`), "compiled" (torch.compile of the spec), then each kernel backend built for the
device. Medians of timed blocks after warm-up (benchmarks/_timing.py; CUDA: events around each block); GB/s counts
x (and y) read once, the [B, D] parameters once and the output written once.
"""

import torch
from _common import kernel_rows, parse_args, print_timed_rows  # benchmarks/kernels/ is on sys.path as a script
from _timing import cpu_threads, device_name  # _common puts benchmarks/ on sys.path

from blitzdiff.kernels.adaln_modulate import (
    KERNEL_DTYPES,
    adaln_gated_residual,
    adaln_gated_residual_ref,
    adaln_modulate,
    adaln_modulate_ref,
)

GPU_SHAPES = [(8, 256, 1152), (8, 1024, 1152)]
CPU_SHAPES = [(2, 256, 384), (2, 256, 1152)]
QUICK_SHAPES = [(1, 16, 64)]


def gated_eager(residual, y, gate):
    return residual + gate[:, None] * y


def variants(op, args, device, dtype, compile_ref: bool) -> dict:
    ref, kernel = {"modulate": (adaln_modulate_ref, adaln_modulate),
                   "gated": (adaln_gated_residual_ref, adaln_gated_residual)}[op]
    eager = adaln_modulate_ref if op == "modulate" else gated_eager
    rows = {"eager": lambda: eager(*args)}
    if compile_ref:
        compiled = torch.compile(ref, fullgraph=True, dynamic=False)
        rows["compiled"] = lambda: compiled(*args)
    return rows | kernel_rows(lambda backend: kernel(*args, backend=backend), device, dtype, KERNEL_DTYPES)


def main() -> None:
    args, device, dtype = parse_args(__doc__, ["float16", "bfloat16", "float32", "float64"], "float16")
    with cpu_threads(args.threads):
        print(f"device: {device_name(device)}; torch {torch.__version__}; {dtype}")
        print(f"{'shape':>16} {'op':>9} {'variant':>9} {'us/call':>9} {'GB/s':>7} {'eager/this':>10}")
        with torch.inference_mode():
            for shape in QUICK_SHAPES if args.quick else CPU_SHAPES if device.type == "cpu" else GPU_SHAPES:
                batch, _, dim = shape
                x, y = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
                shift, scale, gate = torch.randn(batch, 6 * dim, device=device, dtype=dtype).chunk(6, dim=1)[:3]
                cases = {"modulate": ((x, shift, scale), 2 * x.numel() + 2 * shift.numel()),
                         "gated": ((x, y, gate), 3 * x.numel() + gate.numel())}
                for op, (op_args, elements) in cases.items():
                    rows = variants(op, op_args, device, dtype, not args.no_compile)
                    label = "x".join(map(str, shape))
                    print_timed_rows(f"{label:>16} {op:>9}", rows, device, args.repeats, elements * x.element_size())


if __name__ == "__main__":
    main()
