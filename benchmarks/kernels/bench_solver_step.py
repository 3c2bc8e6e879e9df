"""The fused solver step vs the sampling loop's eager ops and torch.compile of its spec.

    python benchmarks/kernels/bench_solver_step.py [--device cpu|cuda] [--dtype float32] [--repeats 30] [--threads N]
        [--no-compile] [--quick]

One plan stage after a classifier-free-guided network call (out = [uncond; cond], w = 4): "2m" is DPM-Solver++(2M)
(x, D_0, D_1), "unipc3" UniPC-3's corrector from its predictor point (point, x, D_0 .. D_3), "sde" an SDE stage
(x, D_0, D_1, noise). Shapes: SD latents [8, 4, 64, 64] (the network sees a CFG batch of 16) and DiT-XL/2 256px
latents [8, 4, 32, 32]; on CPU the defaults are the same (they fit). Rows: "eager" (the loop's own ops:
Denoiser.__call__ then sampler.combine), "compiled" (torch.compile of solver_step_ref, fullgraph), then every
kernel backend built for the device ("cpu"; "cuda", "triton"), each through the op. Each figure is a median
over `repeats` timed blocks of calls after warm-up (CUDA: events around each block). GB/s counts the compulsory
traffic: every input read once, both outputs written once.
"""

import torch
from _common import kernel_rows, parse_args, print_timed_rows  # benchmarks/kernels/ is on sys.path as a script
from _timing import cpu_threads, device_name  # _common puts benchmarks/ on sys.path

from blitzdiff.kernels.solver_step import KERNEL_DTYPES, solver_step, solver_step_ref

SHAPES = {"SD 64x64 latents": (8, 4, 64, 64), "DiT-XL/2 256px latents": (8, 4, 32, 32)}
QUICK_SHAPES = {"8x8 latents": (2, 4, 8, 8)}
W = 4.0
CASES = {  # name: (number of older history tensors, own evaluation point, noise)
    "2m": (1, False, False),
    "unipc3": (3, True, False),
    "sde": (1, False, True),
}


def stage(shape, case, device, dtype) -> tuple[dict, int]:
    """(solver_step kwargs, compulsory bytes) for one stage."""
    n_hist, own_point, noisy = CASES[case]
    randn = lambda *s: torch.randn(s, device=device, dtype=dtype)  # noqa: E731
    x = randn(*shape)
    kw = {"out": randn(2 * shape[0], *shape[1:]), "x": x, "c_skip": 1.2, "c_out": -0.5, "guidance_scale": W,
          "a": 0.9, "b": (0.3, -0.1, 0.05, -0.01)[: n_hist + 1], "history": [randn(*shape) for _ in range(n_hist)],
          "point": randn(*shape) if own_point else None, "s": 0.05 if noisy else 0.0,
          "noise": randn(*shape) if noisy else None}
    tensors = 2 + 1 + n_hist + own_point + noisy + 2  # out (2), x, history, point, noise; 2 outputs
    return kw, tensors * x.numel() * x.element_size()


def eager(kw):
    """The loop's ops: guidance and preconditioning (Denoiser.__call__), then the update (sampler.combine)."""
    x, point = kw["x"], kw["x"] if kw["point"] is None else kw["point"]
    u, c = kw["out"].chunk(2)
    g = u + kw["guidance_scale"] * (c - u)
    denoised = torch.add(point * kw["c_skip"], g, alpha=kw["c_out"])
    x_next = x * kw["a"]
    for coef, t in zip(kw["b"], [denoised, *kw["history"]], strict=True):
        x_next = torch.add(x_next, t, alpha=coef)
    if kw["noise"] is not None:
        x_next = torch.add(x_next, kw["noise"], alpha=kw["s"])
    return denoised, x_next


def variants(kw, device, dtype, compile_ref: bool) -> dict:
    spec_args = lambda: (kw["out"], kw["x"], kw["point"], kw["history"], [], kw["noise"], kw["c_skip"],  # noqa: E731
                         kw["c_out"], kw["guidance_scale"], kw["a"], kw["b"], (), kw["s"])
    rows = {"eager": lambda: eager(kw)}
    if compile_ref:
        compiled = torch.compile(solver_step_ref, fullgraph=True, dynamic=False)
        rows["compiled"] = lambda: compiled(*spec_args())
    return rows | kernel_rows(lambda backend: solver_step(**kw, backend=backend), device, dtype, KERNEL_DTYPES)


def main() -> None:
    args, device, dtype = parse_args(__doc__, ["float16", "bfloat16", "float32", "float64"], "float32")
    with cpu_threads(args.threads):
        print(f"device: {device_name(device)}; torch {torch.__version__}; {dtype}")
        print(f"{'shape':>24} {'case':>7} {'variant':>9} {'us/call':>9} {'GB/s':>7} {'eager/this':>10}")
        with torch.inference_mode():
            for label, shape in (QUICK_SHAPES if args.quick else SHAPES).items():
                for case in CASES:
                    kw, nbytes = stage(shape, case, device, dtype)
                    rows = variants(kw, device, dtype, not args.no_compile)
                    print_timed_rows(f"{label:>24} {case:>7}", rows, device, args.repeats, nbytes)


if __name__ == "__main__":
    main()
