"""Fused GroupNorm (+ SiLU, AdaGN scale / shift, residual) against PyTorch eager and torch.compile of the spec.

    python benchmarks/kernels/bench_group_norm.py [--device cpu|cuda] [--dtype float16] [--repeats 30]
        [--threads N] [--no-compile] [--quick]

Shapes are SD1.5's UNet GroupNorms at 64x64 latents with classifier-free guidance (batch 2; 320 / 640 / 1280
channels, 32 groups), float16 by default on a GPU; on the CPU, float32 and two of the smaller ones. Rows per shape,
layout (NCHW, channels_last) and fusion ("silu": GroupNorm + SiLU, every SD ResNet norm; "adagn_res": + scale /
shift and a residual): "eager" (group_norm_ref: F.group_norm and the elementwise glue), "compiled" (torch.compile of
group_norm_ref), then each fused backend built for the device ("cpu"; "cuda", "triton"). Each figure is a median
over `repeats` timed blocks of calls after warm-up (benchmarks/_timing.py; CUDA: events around each block). GB/s
counts the compulsory traffic: x read once, the output written once, the residual read.
"""

import torch
from _common import kernel_rows, parse_args, print_timed_rows  # benchmarks/kernels/ is on sys.path as a script
from _timing import cpu_threads, device_name  # _common puts benchmarks/ on sys.path

from blitzdiff.kernels import group_norm, group_norm_ref
from blitzdiff.kernels.group_norm import KERNEL_DTYPES

GPU_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
CPU_SHAPES = [(2, 320, 32, 32), (1, 640, 16, 16)]
QUICK_SHAPES = [(1, 64, 8, 8)]
GROUPS, EPS = 32, 1e-5


def variants(shape, dtype, device, layout, fusion, compiled_ref) -> tuple[dict, int]:
    """({name: zero-argument call}, bytes of compulsory traffic) for fresh inputs of one configuration."""
    batch, channels = shape[:2]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    weight, bias = (torch.randn(channels, dtype=dtype, device=device) for _ in range(2))
    kwargs = {"silu": True}
    if fusion == "adagn_res":
        proj = torch.randn(batch, 2 * channels, dtype=dtype, device=device)  # a time projection, split in place
        kwargs.update(scale=proj[:, :channels], shift=proj[:, channels:], residual=torch.randn_like(x))
    calls = {"eager": lambda: group_norm_ref(x, GROUPS, weight, bias, EPS, **kwargs)}
    if compiled_ref is not None:
        calls["compiled"] = lambda: compiled_ref(x, GROUPS, weight, bias, EPS, **kwargs)
    calls |= kernel_rows(lambda b: group_norm(x, GROUPS, weight, bias, EPS, **kwargs, backend=b), device, dtype,
                         KERNEL_DTYPES)
    tensors = 3 if fusion == "adagn_res" else 2
    return calls, tensors * x.numel() * x.element_size()


def main() -> None:
    args, device, dtype = parse_args(__doc__, ["float16", "bfloat16", "float32"], "float16")
    with cpu_threads(args.threads):
        print(f"device: {device_name(device)}; torch {torch.__version__}; {dtype}; {GROUPS} groups")
        print(f"{'shape':>16} {'layout':>13} {'fusion':>9} {'variant':>9} {'us/call':>9} {'GB/s':>7} "
              f"{'eager/this':>10}")
        compiled_ref = None if args.no_compile else torch.compile(group_norm_ref, dynamic=False)
        with torch.inference_mode():
            for shape in QUICK_SHAPES if args.quick else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
                for layout in ("nchw", "channels_last"):
                    for fusion in ("silu", "adagn_res"):
                        calls, nbytes = variants(shape, dtype, device, layout, fusion, compiled_ref)
                        prefix = f"{'x'.join(map(str, shape)):>16} {layout:>13} {fusion:>9}"
                        print_timed_rows(prefix, calls, device, args.repeats, nbytes)


if __name__ == "__main__":
    main()
