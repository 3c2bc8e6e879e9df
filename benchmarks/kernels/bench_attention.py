"""Attention: the Triton, CUDA and C++ kernels vs PyTorch's SDPA backends and torch.compile of the spec.

    python benchmarks/kernels/bench_attention.py [--device cpu|cuda] [--dtypes float16 bfloat16] [--repeats 30]
        [--threads N] [--quick]

Shapes (issue 4): SD1.5's UNet at 64x64 latents (self-attention over 4096 tokens in 8 heads of 40, cross-attention
to 77 text tokens; 1024 tokens in heads of 80 one level down) with a classifier-free-guidance batch of 2, and
DiT-XL/2 (16 heads of 72) at 256 tokens (256 px) and 1024 tokens (512 px), batch 16 (8 images with guidance).
Rows on a GPU: "ref" (SDPA with PyTorch's own backend choice), "sdpa:<backend>" (one SDPA backend forced through
torch.nn.attention.sdpa_kernel; "n/a" where it refuses the shape or dtype), "compile(ref)" (torch.compile of
attention_ref), then "triton" and "cuda" through the op. On the CPU, the embedded models' shapes (unet-digits' 64
tokens in 2 heads of 32; dit-digits' 64 tokens in 4 heads of 24, guided: batch 2 and 16) and smaller SD / DiT ones
(batch 1, 1024 / 256 tokens): "ref" (PyTorch's fused CPU flash kernel), "sdpa:math" and "cpu" (the C++ kernel through
the op); the Triton kernel runs there only in its interpreter, which says nothing about speed, and the CUDA one not
at all, so their figures need a GPU.
Each figure is a median over `repeats` timed blocks of calls after warm-up (CUDA: events around each block).
TFLOP/s counts 4 * B * H * Lq * Lk * D (two matmuls, a multiply-add being 2 flops); softmax work is not counted.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _timing
from _timing import QUICK_HELP, cpu_threads, device_name, time_us  # noqa: E402

from blitzdiff.kernels.attention import attention, attention_ref, kernel_limits  # noqa: E402

# name: (B, H, Lq, Lk, D)
GPU_SHAPES = {
    "SD 64x64 self": (2, 8, 4096, 4096, 40),
    "SD 64x64 cross": (2, 8, 4096, 77, 40),
    "SD 32x32 self": (2, 8, 1024, 1024, 80),
    "SD 32x32 cross": (2, 8, 1024, 77, 80),
    "DiT-XL/2 256px": (16, 16, 256, 256, 72),
    "DiT-XL/2 512px": (16, 16, 1024, 1024, 72),
}
CPU_SHAPES = {
    "unet-digits 8x8": (1, 2, 64, 64, 32),
    "dit-digits b1": (2, 4, 64, 64, 24),
    "dit-digits b8": (16, 4, 64, 64, 24),
    "SD 32x32 self": (1, 8, 1024, 1024, 40),
    "SD 32x32 cross": (1, 8, 1024, 77, 40),
    "DiT-XL/2 256px": (1, 16, 256, 256, 72),
}
QUICK_SHAPES = {"tiny self": (1, 2, 64, 64, 16)}
SDPA_BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def forced_sdpa(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return attention_ref(q, k, v)

    return run


def variants(device: torch.device, compile_ref: bool) -> dict:
    """name -> callable(q, k, v) for every variant that exists on `device`."""
    if device.type != "cuda":
        return {"ref": attention_ref, "sdpa:math": forced_sdpa(SDPBackend.MATH),
                "cpu": lambda q, k, v: attention(q, k, v, backend="cpu")}
    rows = {"ref": attention_ref}
    rows.update({f"sdpa:{name}": forced_sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    if compile_ref:
        rows["compile(ref)"] = torch.compile(attention_ref, dynamic=False)
    rows.update({backend: (lambda q, k, v, b=backend: attention(q, k, v, backend=b)) for backend in ("triton", "cuda")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float16 bfloat16 (GPU), float32 (CPU)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile(ref) row (GPU only; slow to build)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtypes = [getattr(torch, name) for name in (args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32"]))]
    with cpu_threads(args.threads):
        print(f"device: {device_name(device)}, torch {torch.__version__}")
        if not on_gpu:
            print("CPU run: PyTorch's SDPA and the C++ kernel; the Triton and CUDA kernels' figures need a GPU")
        print(f"{'shape':>16} {'B,H,Lq,Lk,D':>20} {'dtype':>9} {'variant':>15} {'ms':>9} {'TFLOP/s':>8} "
              f"{'ref/this':>8}")
        rows = variants(device, compile_ref=not (args.quick or args.no_compile))
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if on_gpu else CPU_SHAPES
        for shape_name, (b, h, lq, lk, d) in shapes.items():
            flops = 4 * b * h * lq * lk * d
            for dtype in dtypes:
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype) for n in (lq, lk, lk))
                ref_ms = None
                torch._dynamo.reset()  # compile(ref) afresh per shape and dtype, never past dynamo's recompile limit
                for name, run in rows.items():
                    prefix = f"{shape_name:>16} {f'{b},{h},{lq},{lk},{d}':>20} {str(dtype)[6:]:>9} {name:>15}"
                    if name in ("triton", "cuda", "cpu") and kernel_limits(q, k, name) is not None:
                        print(f"{prefix} {'n/a':>9}")
                        continue
                    try:
                        with torch.inference_mode():
                            ms = time_us(functools.partial(run, q, k, v), device, args.repeats, cuda_inner=5) / 1e3
                    except RuntimeError as e:  # an SDPA backend refusing the inputs, a kernel not built
                        print(f"{prefix} {'n/a':>9}  ({str(e).splitlines()[0][:60]})")
                        continue
                    ref_ms = ref_ms or ms  # "ref" runs first
                    print(f"{prefix} {ms:9.3f} {flops / ms / 1e9:8.3f} {ref_ms / ms:8.2f}")


if __name__ == "__main__":
    main()
