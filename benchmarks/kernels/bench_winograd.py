"""The models' 3x3 convolution on each CPU path, per input shape: PyTorch's call, oneDNN with the weight prepacked,
blitzdiff's direct kernel (blitzdiff._C.Conv2dNhwc) and its Winograd F(2x2, 3x3) and F(4x4, 3x3) kernels
(blitzdiff._C.Conv2dWinograd).

    python benchmarks/kernels/bench_winograd.py [--repeats 15] [--threads N] [--json out.json] [--quick]

Each row ("b<batch> <in>-><out> <size>x<size>") is one input of a 3x3, stride-1, padding-1 convolution on a
channels-last float32 input: the shapes of unet-digits and of cpu_best.py's 32x32 UNet2D at batches 1 and 8, a
Stable Diffusion-sized one, and the few-channel and few-tile inputs where the Winograd kernels do not pay (the
thresholds WINOGRAD_MIN_IN_CHANNELS, WINOGRAD_MIN_TILES and WINOGRAD4_MIN_PIXELS in blitzdiff/models/conv.py).
Every path is the models' Conv2d module with its plan forced (output allocation and Python checks included, as a
forward pays them), a median over `repeats` timed blocks of calls after warm-up (benchmarks/_timing.py); "GMAC/s"
counts the direct multiply-adds (9 per input channel, output channel and pixel) over the faster Winograd kernel's
time. The last column is the fastest other path's time over the faster Winograd kernel's. Replayed alone, a shape's
weights stay in the cache; in a network they are read cold (the reason for the tile and pixel thresholds: measured
in the forward, README "Winograd convolutions").
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _timing
from _timing import QUICK_HELP, cpu_threads, device_name, median_us  # noqa: E402

from blitzdiff.models import conv as conv_module  # noqa: E402

SHAPES = [  # (batch, in, out, size)
    (1, 32, 32, 16), (1, 64, 64, 8), (1, 96, 32, 16), (1, 64, 64, 4),             # unet-digits, batch 1
    (8, 32, 32, 16), (8, 64, 64, 8), (8, 96, 32, 16), (8, 128, 64, 8),            # and batch 8
    (1, 64, 64, 32), (1, 128, 128, 16), (8, 128, 128, 16), (8, 256, 256, 8),      # the 32x32 UNet2D's
    (1, 320, 320, 32),                                                            # Stable Diffusion's first level
    (1, 4, 32, 32), (1, 3, 16, 16), (1, 128, 128, 4), (1, 64, 64, 2),             # few channels, few tiles
]
PATHS = ["torch", "onednn", "direct", "winograd", "winograd4"]
WINOGRAD = ("winograd", "winograd4")


def forced(conv: conv_module.Conv2d, x: torch.Tensor, path: str) -> None:
    """Set conv's plan for x's shape to `path` (None: PyTorch's call), as _plan would make it."""
    batch, _, height, width = x.shape
    conv.prepacked = conv_module.PrepackedWeight()
    if path == "torch":
        conv.prepacked.plan = (x.shape, None)
    elif path == "onednn":
        conv.prepacked.plan = (x.shape, "onednn", ([1, 1], [1, 1], [1, 1]))
    else:
        conv.prepacked.plan = (x.shape, path, (batch, conv.out_channels, height, width), (batch, height, width))


def time_shape(batch: int, cin: int, cout: int, size: int, repeats: int) -> dict:
    conv = conv_module.Conv2d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last)
    conv.backend = "auto"
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    row = {}
    for path in PATHS:
        if path == "onednn" and not conv_module.onednn_available():
            continue
        forced(conv, x, path)
        row[f"{path}_us"] = median_us(lambda: conv(x), repeats)
    macs = batch * size * size * cin * cout * 9
    winograd_us = min(row[f"{p}_us"] for p in WINOGRAD)
    row["winograd_gmacs"] = macs / winograd_us / 1e3
    row["best_other_over_winograd"] = min(row[f"{p}_us"] for p in PATHS if p not in WINOGRAD and f"{p}_us" in row
                                          ) / winograd_us
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    repeats, shapes = (3, SHAPES[:2]) if args.quick else (args.repeats, SHAPES)
    if conv_module.direct_isa() is None:
        sys.exit("blitzdiff._C is not built: the direct and Winograd kernels are not available")
    rows = []
    with cpu_threads(args.threads) as threads, torch.no_grad():
        print(f"device: {device_name(torch.device('cpu'))}; torch {torch.__version__}; "
              f"native loop: {conv_module.direct_isa()}")
        print(f"{'variant':>18} " + " ".join(f"{p + ' us':>11}" for p in PATHS)
              + f" {'GMAC/s':>7} {'best other / winograd':>21}")
        for batch, cin, cout, size in shapes:
            row = dict(batch=batch, in_channels=cin, out_channels=cout, size=size,
                       **time_shape(batch, cin, cout, size, repeats))
            rows.append(row)
            times = " ".join(f"{row[p + '_us']:11.1f}" if p + "_us" in row else f"{'-':>11}" for p in PATHS)
            variant = f"b{batch} {cin}->{cout} {size}x{size}"
            print(f"{variant:>18} {times} {row['winograd_gmacs']:7.1f} "
                  f"{row['best_other_over_winograd']:20.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": {"device": device_name(torch.device("cpu")),
                                                  "torch": torch.__version__, "threads": threads.record(),
                                                  "native_isa": conv_module.direct_isa(), "repeats": repeats},
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
