"""The direct NHWC convolution (blitzdiff._C.Conv2dNhwc) against PyTorch's own call and prepacked oneDNN, per
convolution of unet-digits' forward, on the CPU.

    python benchmarks/kernels/bench_conv2d_nhwc.py [--batch 1] [--repeats 30] [--threads N] [--json out.json]
        [--quick]

Rows: every distinct convolution (input shape, weight shape, stride) of one unet-digits forward at `batch`, with its
count per forward. Columns: "torch" (F.conv2d on channels-last input and weight, as the default path called it
before: PyTorch's im2col path below its oneDNN threshold, oneDNN above), "onednn" (the models' Conv2d made to run
prepacked oneDNN, the path the models took above PyTorch's threshold before the direct kernel's multiply-add rule),
"module" (the models' Conv2d on the "auto" backend: the path it plans for the shape, the direct kernel where
`direct_pays`: column "variant") and "kernel" (the native kernel's run alone: no output allocation, no Python
checks). Each figure is a median over `repeats` timed blocks of calls after
warm-up (benchmarks/_timing.py); GFLOP/s counts 2 per multiply-add. The last line sums the torch and module columns
weighted by the counts.
"""

import argparse
import collections
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _timing
from _timing import QUICK_HELP, cpu_threads, device_name, median_us  # noqa: E402

import blitzdiff  # noqa: E402
from blitzdiff.models.conv import Conv2d, direct_isa  # noqa: E402


def unet_digits_convolutions(batch: int) -> collections.Counter:
    """(input shape, the Conv2d) -> count, over one unet-digits forward at `batch` (its own modules and weights)."""
    pipe = blitzdiff.load("unet-digits")
    seen: collections.Counter = collections.Counter()
    modules = {}

    def record(module, inputs, _):
        key = (tuple(inputs[0].shape), tuple(module.weight.shape), module.stride)
        seen[key] += 1
        modules[key] = module

    hooks = [m.register_forward_hook(record) for m in pipe.model.modules() if isinstance(m, Conv2d)]
    with torch.no_grad():
        pipe.model(torch.randn(batch, 1, 16, 16), torch.full((batch,), 500.0))
    for hook in hooks:
        hook.remove()
    return collections.Counter({(key, modules[key]): count for key, count in seen.items()})


def time_convolution(conv: Conv2d, shape: tuple, repeats: int) -> dict:
    """Median microseconds of PyTorch's call, prepacked oneDNN's, the module's and (on a native path) the kernel's on
    a random channels-last input of `shape`; the module's path and GFLOP/s."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    torch_us = median_us(lambda: F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding), repeats)
    onednn = copy.deepcopy(conv)  # a copy starts without packed weights (PrepackedWeight)
    onednn.prepacked.plan = (x.shape, "onednn", (list(conv.padding), list(conv.stride), list(conv.dilation)))
    onednn_us = median_us(lambda: onednn(x), repeats)
    out = conv(x)
    path = conv.prepacked.plan[1]
    module_us = median_us(lambda: conv(x), repeats)
    kernel_us = None
    if path in ("direct", "winograd", "winograd4"):
        kernel, sizes = getattr(conv.prepacked, path)[3][1], conv.prepacked.plan[3]
        kernel_us = median_us(lambda: kernel.run(out.data_ptr(), x.data_ptr(), conv.bias.data_ptr(), *sizes,
                                                 torch.get_num_threads()), repeats)
    flops = 2 * conv.weight.numel() * out.shape[2] * out.shape[3]
    return {"torch_us": torch_us, "onednn_us": onednn_us, "module_us": module_us, "kernel_us": kernel_us, "path": path,
            "module_gflops": flops / module_us / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: blitzdiff bench's rule, the cores the load leaves)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    rows = []
    with cpu_threads(args.threads) as threads, torch.no_grad():
        print(f"device: {device_name(torch.device('cpu'))}; torch {torch.__version__}; direct loop: {direct_isa()}")
        print(f"{'input':>16} {'weight':>17} {'s':>1} {'n':>2} {'torch us':>9} {'onednn us':>9} {'module us':>9} "
              f"{'kernel us':>9} {'variant':>9} {'GFLOP/s':>8} {'torch/module':>12}")
        convolutions = unet_digits_convolutions(args.batch)
        for ((shape, weight_shape, stride), conv), count in sorted(convolutions.items(), key=lambda kv: kv[0][0]):
            if args.quick and len(rows) == 2:
                break
            row = time_convolution(conv, shape, repeats)
            row.update(input=shape, weight=weight_shape, stride=stride[0], count=count)
            rows.append(row)
            torch_us, onednn_us, module_us, kernel_us = (row[f"{key}_us"]
                                                         for key in ("torch", "onednn", "module", "kernel"))
            kernel_text = f"{kernel_us:9.1f}" if kernel_us is not None else f"{'-':>9}"
            print(f"{str(shape):>16} {str(weight_shape):>17} {stride[0]:>1} {count:>2} {torch_us:9.1f} "
                  f"{onednn_us:9.1f} {module_us:9.1f} {kernel_text} {str(row['path']):>9} {row['module_gflops']:8.1f} "
                  f"{torch_us / module_us:12.2f}")
        total = {key: sum(row[key] * row["count"] for row in rows) for key in ("torch_us", "onednn_us", "module_us")}
        print(f"per forward: torch {total['torch_us']:.0f} us, onednn {total['onednn_us']:.0f} us, "
              f"module {total['module_us']:.0f} us "
              f"({total['torch_us'] / total['module_us']:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": {"device": device_name(torch.device("cpu")),
                                                  "torch": torch.__version__, "threads": threads.record(),
                                                  "direct_isa": direct_isa(), "repeats": repeats,
                                                  "batch": args.batch},
                                         "rows": rows, "per_forward_us": total}, indent=1))


if __name__ == "__main__":
    main()
