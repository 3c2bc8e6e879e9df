"""Export a Pipeline's network, its VAE decoder, or its whole fixed-step sampling loop to ONNX (ARCHITECTURE.md
contract 7).

Traced with `torch.onnx.export(..., dynamo=True)` and the reference kernels (plain PyTorch ops, so ONNX sees only
standard ops). The loop graph is the engine's own code: a `Denoiser` over the network and `run_plan` of the plan,
traced once, so every stage is unrolled (no Loop / If: what ONNX Runtime and TensorRT can CUDA-graph) and the
per-sample noise is the counter-based hash of blitzdiff.kernels.gaussian_noise as integer tensor ops. Names follow
diffusers / Optimum: `sample`, `timestep`, `class_labels`, `encoder_hidden_states` -> `out_sample` for the
network; `latent_sample` -> `sample` for the VAE decoder; `noise`, `seeds`, conditioning, `guidance_scale` ->
`sample` for the loop. The network runs in float32 or float16 (blitzdiff.export.precision: what a float16 graph
still computes in float32); a UNet's height and width may be dynamic (blitzdiff.export.inputs). A folder is written
under a temporary name and renamed when complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.config import resolve
from ..engine.denoiser import Denoiser
from ..engine.functional import parameterization, postprocessing
from ..engine.network import NetworkCall
from ..engine.sampler import run_plan
from ..engine.solvers import build_plan
from .inputs import Size, check_size, dynamic_shapes, input_specs
from .manifest import GRAPH, staged_folder, weights_digest, write_manifest
from .precision import FLOAT32_OPS, dtype_name, export_dtype, float32_translations, in_dtype

WHATS = ("denoiser", "loop", "vae")
OPSETS = range(18, 24)  # what torch.onnx's dynamo exporter emits
DEFAULT_OPSET = 18
DEFAULT_BATCH = (1, 64)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to external data (protobuf files stop at 2 GiB)


@contextlib.contextmanager
def reference_kernels(model: nn.Module) -> Iterator[None]:
    """Every kernel-calling module of `model` on the "ref" backend (plain ops for the exporter), restored after."""
    saved = [(module, module.backend) for module in model.modules() if hasattr(module, "backend")]
    try:
        for module, _ in saved:
            module.backend = "ref"
        yield
    finally:
        for module, backend in saved:
            module.backend = backend


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx's notices that say nothing about the user's export, silenced while it runs: the torchvision ops it
    skips registering (logged), pytree's LeafSpec deprecation and the batch axis shared by several inputs
    (warnings)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        logger.setLevel(level)


class DenoiserGraph(nn.Module):
    """The network as diffusers calls it: (sample, timestep[, condition]) -> out_sample (all output channels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(sample, timestep, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states)


class DecoderGraph(nn.Module):
    """The VAE decoder: latent_sample [B, c, h, w] (as the sampler returns it) -> sample [B, C, H, W] in ~[-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample)


class LoopGraph(nn.Module):
    """The whole sampling run of `pipe.sample(..., output_type="raw")` for one sampler and step count: the same
    Denoiser and run_plan, inputs (noise [B, C, H, W] unit, seeds [B] int64, conditioning, guidance_scale []). The
    state stays float32; NetworkCall runs `model` (pipe's network, or its copy in the export's dtype) in its dtype."""

    def __init__(self, pipe: Any, model: nn.Module, sampler: str | None, steps: int, eta: float | None, guided: bool):
        super().__init__()
        config = resolve(sampler, pipe.scheduler_config)
        self.model, self.kind, self.guided = model, pipe.kind, guided
        self.plan = build_plan(config, steps, eta=eta)
        self.prediction, self.constants = parameterization(config)
        self.postprocess = postprocessing(config)

    def forward(self, noise: torch.Tensor, seeds: torch.Tensor, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                negative_encoder_hidden_states: torch.Tensor | None = None,
                guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
        cond: dict[str, torch.Tensor] = {}
        uncond: dict[str, torch.Tensor] | None = None
        if class_labels is not None:
            cond["class_labels"] = class_labels
            if self.guided:
                uncond = {"class_labels": torch.full_like(class_labels, self.kind.null_class)}
        if encoder_hidden_states is not None:
            cond["encoder_hidden_states"] = encoder_hidden_states
            if self.guided:
                uncond = {"encoder_hidden_states": negative_encoder_hidden_states}
        scale = guidance_scale if self.guided else 1.0
        call = NetworkCall(self.model, self.kind.prediction_channels)
        denoiser = Denoiser(call, self.plan, self.prediction, batch=noise.shape[0], device=noise.device, cond=cond,
                            uncond=uncond, guidance_scale=scale, **self.constants)
        return run_plan(self.plan, denoiser, noise * self.plan.init_scale, seeds, self.postprocess, "ref")


def _check_options(pipe: Any, what: str, steps: int | None, batch: Sequence[int], opset: int) -> tuple[int, int]:
    if what not in WHATS:
        raise ValueError(f"unknown export {what!r}; allowed: {', '.join(WHATS)}")
    if what == "vae" and pipe.vae is None:
        raise ValueError(f"{pipe.name or 'this pipeline'} has no VAE decoder to export")
    if what == "loop" and steps is None:
        raise ValueError("what='loop' exports a fixed number of steps: pass steps (--steps)")
    if opset not in OPSETS:
        raise ValueError(f"opset {opset!r} is not supported; allowed: {OPSETS.start}..{OPSETS.stop - 1}")
    if (len(batch) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in batch)
            or not 1 <= batch[0] <= batch[1]):
        raise ValueError(f"batch must be (min, max) ints with 1 <= min <= max, got {tuple(batch)!r}")
    return batch[0], batch[1]


def export_onnx(
    pipe: Any,
    out_dir: str | Path,
    *,
    what: str = "denoiser",
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    batch: Sequence[int] = DEFAULT_BATCH,
    dtype: torch.dtype | str | None = None,
    size: Sequence[Sequence[int]] | None = None,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    optimize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir/model.onnx` and `out_dir/export.json` (blitzdiff.export.manifest); returns out_dir.

    what: "denoiser" (the network), "vae" (the VAE decoder) or "loop" (the whole `steps`-step run of `sampler`,
    guided when guidance_scale, default pipe.default_guidance_scale, is not 1: the scale itself is an input).
    batch: (min, max) of the dynamic batch dimension. dtype: the network's dtype in the graph, "float32" or "float16"
    (None: the pipeline's; bfloat16 is refused, see blitzdiff.export.precision); a copy of the network is converted
    when it differs, the pipeline is never changed. A float16 denoiser takes sample / encoder_hidden_states and returns
    out_sample in float16 (timestep float32, class_labels int64); a float16 loop keeps its state float32 (noise in,
    sample out; prompts in float16), as Pipeline runs a float16 network; a float16 VAE decoder is float16 in and out.
    size: ((height_min, height_max), (width_min, width_max)) in latent pixels: the dynamic height and width of a UNet
    denoiser, multiples of 2 ** its down-sampling stages (None: fixed at the sample size). external_data: weights in
    a separate file (default: when they exceed 1 GiB). optimize: run the ONNX optimizer (constant folding, fusions)
    over the traced graph: most of the export time for a loop (converting a traced 4-step loop of unet-digits: 54 s
    against 16 s), and a smaller graph that runs faster (2,580 against 8,530 nodes; 29 against 54 ms per run on ORT's
    CPU provider); turn it off for quick iterations. The graph is checked by onnx.checker before the folder appears
    under its name.
    """
    import onnx

    out_dir = Path(out_dir)
    low, high = _check_options(pipe, what, steps, batch, opset)
    dtype = export_dtype(dtype, pipe.vae if what == "vae" else pipe.model)
    sized = check_size(pipe, what, size)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} exists; choose a new folder or pass overwrite=True (--overwrite)")
    if not out_dir.parent.is_dir():
        raise ValueError(f"{out_dir}: folder {out_dir.parent} does not exist")
    scale = pipe.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    guided = what == "loop" and scale != 1.0
    if guided and pipe.kind.null_class is None and not pipe.kind.text_conditional:
        raise ValueError(f"guidance_scale={scale:g} needs a model trained with a null class or one taking prompt "
                         "embeddings; export this one with guidance_scale=1.0")
    network = in_dtype(pipe.vae if what == "vae" else pipe.model, dtype)
    module = {"denoiser": lambda: DenoiserGraph(network), "vae": lambda: DecoderGraph(network),
              "loop": lambda: LoopGraph(pipe, network, sampler, steps, eta, guided)}[what]().eval()
    example_batch = min(max(2, low), high)  # not 1 where the range allows: torch.export specializes size-1 dims
    specs = input_specs(pipe, what, example_batch, guided, dtype, sized)
    dynamic = dynamic_shapes(specs, (low, high), sized)
    output = {"denoiser": "out_sample", "vae": "sample", "loop": "sample"}[what]
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    with staged_folder(out_dir) as temporary:
        with torch.no_grad(), reference_kernels(network), quiet_exporter():
            examples = {spec["name"]: spec["example"] for spec in specs}  # by name: the forward's parameters
            reference = module(**examples)  # also fills lazily computed tables (DiT's positions) before tracing
            try:
                program = torch.onnx.export(module, (), kwargs=examples, dynamo=True, opset_version=opset,
                                            input_names=[spec["name"] for spec in specs], output_names=[output],
                                            dynamic_shapes=dynamic, optimize=optimize, verbose=False,
                                            custom_translation_table=float32_translations(dtype))
            except Exception as err:  # noqa: BLE001 - torch.export / onnxscript raise many types
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"could not export the {what} of {pipe.name or network.diffusers_class} "
                                 f"({network.diffusers_class}) to ONNX: {first}") from err
        program.save(str(temporary / GRAPH), external_data=external)
        onnx.checker.check_model(str(temporary / GRAPH))
        manifest = _manifest(pipe, network, what, specs, output, reference, opset, (low, high), sized, module,
                             sampler, steps, eta, guided)
        write_manifest(temporary, {**manifest, "optimized": optimize})
    return out_dir


def _manifest(pipe: Any, network: nn.Module, what: str, specs: list[dict[str, Any]], output: str,
              reference: torch.Tensor, opset: int, batch: tuple[int, int], size: Size | None, module: nn.Module,
              sampler: str | None, steps: int | None, eta: float | None, guided: bool) -> dict[str, Any]:
    """What the graph takes and returns and how it was made; "model" describes the network as exported (its dtype,
    and weights_sha256 over its weights in that dtype: manifest.weights_digest)."""
    import onnx

    from .. import __version__

    dtype = next(network.parameters()).dtype
    out_shape = ["batch", *reference.shape[1:]]
    if size is not None:  # the denoiser's out_sample has its sample's height and width
        out_shape[2:] = ["height", "width"]
    manifest: dict[str, Any] = {
        "what": what, "opset": opset, "batch": list(batch),
        **({"size": size.manifest()} if size is not None else {}),
        "inputs": [{k: spec[k] for k in ("name", "dtype", "shape")} for spec in specs],
        "outputs": [{"name": output, "dtype": dtype_name(reference.dtype), "shape": out_shape}],
        "precision": {"dtype": dtype_name(dtype), "float32_ops": list(FLOAT32_OPS)},
        "model": {"name": pipe.name, "class": network.diffusers_class, "config": dict(network.config),
                  "dtype": dtype_name(dtype), "weights_sha256": weights_digest(network)},
        "scheduler_config": pipe.scheduler_config,
        "versions": {"blitzdiff": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "python": platform.python_version()},
    }
    if what == "loop":
        plan = module.plan
        manifest["loop"] = {"sampler": resolve(sampler, pipe.scheduler_config).name, "steps": steps, "eta": eta,
                            "guided": guided, "evaluations": len(plan.stages), "plan": asdict(plan)}
    return manifest
