"""The models' linear layers on the CPU: F.linear (PyTorch's addmm: MKL's sgemm on x86 wheels) against blitzdiff's
register-tiled kernel (blitzdiff.models.linear: blitzdiff._C.Conv2dNhwc as a 1x1 convolution over the rows).

    python benchmarks/kernels/bench_linear.py [--repeats 30] [--threads N] [--json out.json] [--quick]

Rows (rows x in -> out): dit-digits' layers at batch 1 and 8 with guidance (128 / 1024 token rows; 16 rows for the
packed conditioning), unet-digits' attention and time layers, and larger models' (SD 1.5's first level, its VAE
decoder's mid-block attention at 512 px, DiT-XL/2 at 256 px, one image with guidance) that decide
linear.DIRECT_MAX_IN_FEATURES. Columns: "addmm" (F.linear), "kernel"
(linear.DirectLinear's call: the kernel, its output's allocation and the Python checks), their ratio, and each one's
largest error against float64, relative to the largest |output|. Each figure is a median over `repeats` timed
blocks of calls after warm-up (benchmarks/_timing.py); GFLOP/s counts 2 per multiply-add.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _timing
from _timing import QUICK_HELP, cpu_threads, device_name, median_us  # noqa: E402

from blitzdiff.models import linear  # noqa: E402

# name: (rows, in_features, out_features)
SHAPES = {
    "dit-digits b8 qkv": (1024, 96, 288),
    "dit-digits b8 out": (1024, 96, 96),
    "dit-digits b8 ff in": (1024, 96, 384),
    "dit-digits b8 ff out": (1024, 384, 96),
    "dit-digits b8 t-MLP (packed)": (16, 256, 576),
    "dit-digits b8 final adaLN": (16, 96, 192),
    "dit-digits b8 unpatchify proj": (1024, 96, 4),
    "dit-digits b1 qkv": (128, 96, 288),
    "dit-digits b1 ff in": (128, 96, 384),
    "dit-digits b1 ff out": (128, 384, 96),
    "unet-digits b8 attention qkv": (512, 64, 192),
    "unet-digits b8 time linear_1": (8, 32, 128),
    "SD 64x64 level 1 qkv": (8192, 320, 960),
    "SD 64x64 level 1 ff out": (8192, 1280, 320),
    "SD VAE 64x64 mid attention qkv": (4096, 512, 1536),
    "SD VAE 64x64 mid attention out": (4096, 512, 512),
    "DiT-XL/2 256px qkv": (512, 1152, 3456),
    "DiT-XL/2 256px ff out": (512, 4608, 1152),
}
QUICK_SHAPES = {"tiny": (16, 32, 48), "one row": (1, 24, 8)}


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |out - exact| relative to the largest |exact|."""
    return float((out.double() - exact).abs().max() / exact.abs().max())


def time_shape(rows: int, in_features: int, out_features: int, repeats: int) -> dict:
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    bias = torch.randn(out_features)
    direct = linear.DirectLinear()
    exact = torch.addmm(bias.double(), x.double(), weight.double().t())
    with torch.no_grad():
        kernel_out = direct(x, weight, bias)
        row = {"rows": rows, "in": in_features, "out": out_features,
               "addmm_us": median_us(lambda: F.linear(x, weight, bias), repeats),
               "addmm_error": relative_error(F.linear(x, weight, bias), exact)}
        if kernel_out is not None:
            row.update(kernel_us=median_us(lambda: direct(x, weight, bias), repeats),
                       kernel_error=relative_error(kernel_out, exact))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: blitzdiff bench's rule)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    shapes, repeats = (QUICK_SHAPES, 3) if args.quick else (SHAPES, args.repeats)
    with cpu_threads(args.threads):
        print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}; the models run the kernel up to "
              f"{linear.DIRECT_MAX_IN_FEATURES} inputs (larger shapes timed here anyway)")
        linear.DIRECT_MAX_IN_FEATURES = sys.maxsize  # this process only: time the kernel past the models' bound
        print(f"{'layer':32} {'rows x in -> out':>20} {'addmm us':>10} {'kernel us':>10} {'ratio':>6} "
              f"{'GFLOP/s':>15} {'rel. error':>19}")
        rows = []
        for name, shape in shapes.items():
            row = {"name": name, **time_shape(*shape, repeats)}
            rows.append(row)
            flops = 2 * shape[0] * shape[1] * shape[2]
            size = f"{shape[0]} x {shape[1]} -> {shape[2]}"
            if "kernel_us" not in row:
                print(f"{name:32} {size:>20} {row['addmm_us']:10.1f} {'n/a':>10}")
                continue
            print(f"{name:32} {size:>20} {row['addmm_us']:10.1f} {row['kernel_us']:10.1f} "
                  f"{row['kernel_us'] / row['addmm_us']:6.2f} {flops / row['addmm_us'] / 1e3:7.1f} "
                  f"{flops / row['kernel_us'] / 1e3:7.1f} {row['addmm_error']:9.1e} {row['kernel_error']:9.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(torch.device("cpu")), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
