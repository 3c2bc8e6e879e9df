"""The timestep embedding and the time MLP: the kernels vs PyTorch eager and torch.compile of the specs.

    python benchmarks/kernels/bench_timestep_embedding.py [--device cpu|cuda] [--dtype float16] [--repeats 30]
        [--threads N] [--no-compile] [--quick]

Sizes of issue 4: SD1.5 (320 -> 1280 -> 1280, a CFG batch of 2 and of 16) and DiT-XL/2 (256 -> 1152 -> 1152,
batch 8). Both ops are latency-bound (a few KB of output; the MLP reads its weights once), so the figure that
matters is us/call; GB/s for the MLP counts its weights read once. Rows: "eager" (the spec's torch ops), "compiled"
(torch.compile of the spec), then each kernel backend built for the device. Medians of timed blocks after warm-up
(benchmarks/_timing.py; CUDA: events around each block); the MLP's weights default to float16 on a GPU, float32 on
CPU.
"""

import torch
from _common import kernel_rows, parse_args, print_timed_rows  # benchmarks/kernels/ is on sys.path as a script
from _timing import cpu_threads, device_name  # _common puts benchmarks/ on sys.path

from blitzdiff.kernels.timestep_embedding import (
    MLP_DTYPES,
    timestep_embedding,
    timestep_embedding_ref,
    timestep_mlp,
    timestep_mlp_ref,
)

# name: (batch, embedding dim, hidden, flip_sin_to_cos, downscale_freq_shift)
CASES = {"SD1.5 CFG 2": (2, 320, 1280, True, 0.0), "SD1.5 CFG 16": (16, 320, 1280, True, 0.0),
         "DiT-XL/2 8": (8, 256, 1152, True, 1.0)}
QUICK_CASES = {"tiny 2": (2, 32, 64, True, 0.0)}


def rows(ref, op, args, kwargs, device, dtype, compile_ref: bool) -> dict:
    found = {"eager": lambda: ref(*args, **kwargs)}
    if compile_ref:
        compiled = torch.compile(lambda *a: ref(*a, **kwargs), fullgraph=True, dynamic=False)
        found["compiled"] = lambda: compiled(*args)
    return found | kernel_rows(lambda backend: op(*args, **kwargs, backend=backend), device, dtype, MLP_DTYPES)


def main() -> None:
    args, device, dtype = parse_args(__doc__, ["float16", "bfloat16", "float32"], "float16", "the MLP's weights; ")
    with cpu_threads(args.threads):
        print(f"device: {device_name(device)}; torch {torch.__version__}; MLP weights {dtype}")
        print(f"{'case':>14} {'op':>9} {'variant':>9} {'us/call':>9} {'GB/s':>7} {'eager/this':>10}")
        with torch.inference_mode():
            for label, (batch, dim, hidden, flip, shift) in (QUICK_CASES if args.quick else CASES).items():
                t = torch.randint(0, 1000, (batch,), device=device)
                kwargs = {"flip_sin_to_cos": flip, "downscale_freq_shift": shift}
                weights = [torch.randn(size, device=device, dtype=dtype) * 0.02
                           for size in ((hidden, dim), (hidden,), (hidden, hidden), (hidden,))]
                cases = {"embedding": (timestep_embedding_ref, timestep_embedding, (t, dim), 0),
                         "mlp": (timestep_mlp_ref, timestep_mlp, (t, *weights), sum(w.nbytes for w in weights))}
                for op_name, (ref, op, op_args, nbytes) in cases.items():
                    found = rows(ref, op, op_args, kwargs, device, dtype, not args.no_compile)
                    print_timed_rows(f"{label:>14} {op_name:>9}", found, device, args.repeats, nbytes)


if __name__ == "__main__":
    main()
