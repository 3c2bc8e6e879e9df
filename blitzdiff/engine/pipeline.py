"""The Pipeline: a loaded checkpoint (blitzdiff.engine.loading.load), sampled with the scheduler core.

The Pipeline owns the network (UNet2DModel, UNet2DConditionModel or DiT), the folder's scheduler config and the
optional VAE decoder. It turns its arguments into the functional API's `fn(x, t, **cond)`, conditioning and
guidance, runs `blitzdiff.sample`, then decodes and post-processes. Progress bars and callbacks live in the `fn`
wrapper, outside the sampling loop (which stays sync-free).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels.gaussian_noise import MAX_STREAM
from ..malloc import tune_malloc_once
from ..models import load_model, set_backend, set_channels_last
from .config import resolve
from .cpu_graph import CpuGraphs
from .denoiser import is_guided
from .functional import sample
from .inputs import finite_number, guidance_values, integer_values, positive_int
from .network import Callback, NetworkCall, NonFiniteOutput
from .noise import gaussian, resolve_noise_backend, seed_tensor
from .runtime import DEFAULT_BUCKETS, EXTERNAL_MODES, Request, Runtime, check_options
from .sampler import Scope
from .solvers import build_plan

OUTPUT_TYPES = ("pil", "numpy", "tensor", "raw")
NON_FINITE_POLICIES = ("raise", "retry")
# The initial noise of sample i is drawn from the last stream of its seed: the loop's stages use streams 2k, 2k + 1.
INITIAL_NOISE_STREAM = MAX_STREAM - 1


@dataclass(frozen=True)
class ModelKind:
    """What the pipeline must feed the network: class labels (and the null class for guidance), prompt
    embeddings, or nothing; and how many leading output channels are the prediction (learned sigma is dropped)."""

    class_conditional: bool
    null_class: int | None
    text_conditional: bool
    prediction_channels: int


def model_kind(model: torch.nn.Module) -> ModelKind:
    config = model.config
    if model.diffusers_class == "DiTTransformer2DModel":
        # The label table always has the null row (index num_embeds_ada_norm), as in diffusers; the leading
        # in_channels outputs are the prediction (with learned sigma the rest is the variance, dropped).
        return ModelKind(True, config["num_embeds_ada_norm"], False, config["in_channels"])
    if model.diffusers_class == "UNet2DConditionModel":
        return ModelKind(False, None, True, config["out_channels"])
    classes = config.get("num_class_embeds")
    return ModelKind(classes is not None, None, False, config["out_channels"])


class Pipeline:
    """A loaded checkpoint: network, scheduler config, optional VAE decoder; `sample()` runs the whole job."""

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        vae: torch.nn.Module | None = None,
        *,
        name: str = "",
        guidance_scale: float | None = None,
    ):
        self.model = model.eval()
        self.recommended_guidance_scale = guidance_scale  # a folder's own default (model_index.json), or None
        self.scheduler_config = dict(scheduler_config)
        self.vae = vae.eval() if vae is not None else None
        self.kind = model_kind(model)
        self.name = name
        try:  # the folder's default sampler; a scheduler class blitzdiff lacks (e.g. PNDM) needs sampler= later
            self.sampler_name: str | None = resolve(None, self.scheduler_config).name
        except ValueError:
            self.sampler_name = None
        self.runtime: Runtime | None = None  # set by compile(); None: the plain eager loop
        # the plain eager loop's network on the CPU: each input layout's forward captured once and replayed
        # (blitzdiff.engine.cpu_graph); None: eager forwards
        self.cpu_graphs: CpuGraphs | None = CpuGraphs(self.model)
        self.weights_version = 0  # counts load_weights calls: an external runtime re-exports or refits on a change

    def compile(
        self,
        mode: str = "graph",
        *,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_graphs: int = 8,
        compile_loop: bool = False,
        kernels: str | None = None,
        channels_last: bool | None = None,
        **options: Any,
    ) -> Pipeline:
        """Run later samples through a compiled runtime (blitzdiff.engine.runtime); returns the pipeline.

        mode: "graph" (the whole loop in one CUDA graph per bucket key), "step" (one CUDA graph per step; a callback
        runs between them), "compile" (torch.compile of the network; compile_loop=True compiles the whole loop with
        the network inlined, fullgraph: faster on small models, with compile time growing with the step count),
        "eager" (buckets and static buffers only: the reference), "onnxruntime" / "tensorrt" (the eager loop around
        the network exported to ONNX and run by ONNX Runtime or a TensorRT engine: exported and loaded here; options
        go to blitzdiff.export.ort_network.network / blitzdiff.export.trt.network, e.g. providers=...). Requests run
        padded in the smallest of `buckets` >= n; at most max_graphs bucket keys are kept (least recently used
        dropped). Otherwise nothing is built here: each new (bucket, shape, dtype, sampler, steps, eta, guided,
        conditioning) key pays its build on its first call.
        kernels: set the network's kernel backend ("auto", "ref", "triton", "cuda", "cpu"); None keeps it.
        channels_last: store the network's 4-D weights channels-last (True), so that it runs NHWC (faster on the
        CPU for the UNets measured; NHWC convolution kernels on GPU), or contiguous (False); None keeps them
        (blitzdiff.load stores them channels-last on the CPU: blitzdiff.models.default_channels_last).
        """
        buckets = check_options(mode, buckets, max_graphs, compile_loop, self.device, options)
        if channels_last is not None:
            set_channels_last(self.model, channels_last)
        if kernels is not None:
            set_backend(self.model, kernels)
        runtime = Runtime(mode, buckets, max_graphs, compile_loop, options)
        if mode in EXTERNAL_MODES:
            runtime.prepare(self)
        self.runtime = runtime
        return self

    def cpu_network(self, model: torch.nn.Module) -> Any:
        """What the eager loop calls for `model`: the CPU graphs when they are on and wrap it on the CPU, else it."""
        graphs = self.cpu_graphs
        return graphs if graphs is not None and graphs.model is model and self.device.type == "cpu" else model

    def runtime_stats(self) -> dict[str, Any]:
        """The compiled runtime's mode, buckets and cached entries (key, build seconds, bytes, hits); {} when
        compile() was not called."""
        return {} if self.runtime is None else self.runtime.stats()

    def load_weights(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        """Replace the network's weights with a checkpoint of the same architecture, in place: compiled code and
        captured graphs read the same memory, so they run the new weights without a rebuild; an external runtime
        (onnxruntime, tensorrt) re-exports or refits its network here."""
        new = load_model(path, device=self.device, dtype=self.dtype, allow_pickle=allow_pickle)
        if new.diffusers_class != self.model.diffusers_class or new.config != self.model.config:
            raise ValueError(f"{path}: its {new.diffusers_class} config differs from the loaded "
                             f"{self.model.diffusers_class}'s; load it as a new pipeline (blitzdiff.load)")
        with torch.no_grad():
            for name, tensor in new.state_dict().items():
                self.model.state_dict()[name].copy_(tensor)
        self.weights_version += 1
        if self.runtime is not None and self.runtime.mode in EXTERNAL_MODES:
            self.runtime.prepare(self)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel: 2 ** (number of VAE up-sampling stages), 1 without a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        config = self.model.config
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        scale = self.latent_scale
        h = size[0] if height is None else height // scale
        w = size[1] if width is None else width // scale
        for name, pixels, latent in (("height", height, h), ("width", width, w)):
            if pixels is not None and (pixels % scale or latent < 1):
                raise ValueError(f"{name}={pixels} must be a positive multiple of {scale} (the VAE's scale)")
        return config["in_channels"], h, w

    def initial_noise(self, seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Unit noise [len(seeds), *shape], float32: row i a function of seeds[i] only (any batch gives it the same)."""
        backend = resolve_noise_backend("auto", seeds.device, torch.float32)
        return gaussian(seeds, INITIAL_NOISE_STREAM, shape, torch.float32, backend=backend)

    def conditioning(
        self,
        n: int,
        class_labels: int | Sequence[int] | torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        negative_encoder_hidden_states: torch.Tensor | None,
        guidance_scale: float | Sequence[float],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(cond, uncond) keyword tensors for fn, checked against the model; guided unless guidance_scale is 1 (one
        scale per sample: guided)."""
        kind, device = self.kind, self.device
        guided = is_guided(guidance_scale)
        cond: dict[str, torch.Tensor] = {}
        uncond: dict[str, torch.Tensor] | None = None
        if kind.class_conditional:
            if class_labels is None:
                raise ValueError(f"{self.name or 'this model'} is class-conditional: pass class_labels (an int or one "
                                 f"per sample, in 0..{self.num_classes - 1})")
            labels = torch.tensor(integer_values("class_labels", class_labels), dtype=torch.int64)
            labels = labels.expand(n) if labels.numel() == 1 else labels
            if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"class_labels must be an int or {n} ints in 0..{self.num_classes - 1}, got "
                                 f"{labels.tolist()}")
            cond["class_labels"] = labels.to(device)
            if guided:
                if kind.null_class is None:
                    raise ValueError("this model was not trained with a null class (class_dropout_prob = 0): "
                                     "guidance_scale must be 1.0")
                uncond = {"class_labels": torch.full_like(cond["class_labels"], kind.null_class)}
        elif class_labels is not None:
            raise ValueError("class_labels given, but this model is not class-conditional")
        if kind.text_conditional:
            if encoder_hidden_states is None:
                raise ValueError("this UNet2DConditionModel needs encoder_hidden_states (prompt embeddings "
                                 f"[n, tokens, {self.model.config['cross_attention_dim']}])")
            cond["encoder_hidden_states"] = self._embeddings("encoder_hidden_states", encoder_hidden_states, n)
            if guided:
                if negative_encoder_hidden_states is None:
                    raise ValueError(f"guidance_scale={guidance_scale} needs negative_encoder_hidden_states (e.g. the "
                                     "embedding of the empty prompt), or guidance_scale=1.0")
                negative = self._embeddings("negative_encoder_hidden_states", negative_encoder_hidden_states, n)
                uncond = {"encoder_hidden_states": negative}
        elif encoder_hidden_states is not None or negative_encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states given, but this model takes no prompt embeddings")
        if guided and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model; this one is unconditional")
        return cond, uncond

    def evaluations(self, steps: int, sampler: str | None = None, eta: float | None = None) -> int:
        """Network evaluations of one sampling run of `steps` steps (the plan's stages: Heun's are 2 * steps - 1)."""
        return len(build_plan(resolve(sampler, self.scheduler_config), steps, eta=eta).stages)

    @property
    def default_guidance_scale(self) -> float:
        """What guidance_scale=None means: the folder's recommendation (model_index.json's
        "_blitzdiff_guidance_scale", which the embedded models carry), else 4.0 for a model trained with a null class
        (diffusers' DiTPipeline default), else 1.0 (unguided)."""
        if self.recommended_guidance_scale is not None:
            return self.recommended_guidance_scale
        return 4.0 if self.kind.null_class is not None else 1.0

    @property
    def num_classes(self) -> int:
        config = self.model.config
        return config["num_embeds_ada_norm"] if "num_embeds_ada_norm" in config else config["num_class_embeds"]

    def _embeddings(self, name: str, tensor: torch.Tensor, n: int) -> torch.Tensor:
        width = self.model.config["cross_attention_dim"]
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[-1] != width:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor [n or 1, tokens, {width}], got {shape}")
        if tensor.shape[0] not in (1, n):
            raise ValueError(f"{name} has batch {tensor.shape[0]}; it must be 1 or n={n}")
        return tensor.to(self.device, self.dtype).expand(n, -1, -1)

    @torch.inference_mode()
    def sample(
        self,
        n: int = 1,
        *,
        steps: int,
        sampler: str | None = None,
        seeds: int | Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
        progress: bool = True,
        on_non_finite: str = "raise",
        scope: Scope | None = None,
    ):
        """n samples. The folder's scheduler config picks the sampler unless `sampler` names one (its config fields
        still apply where that sampler has them). seeds: an int s (sample i gets s + i) or n ints; they key both the
        initial noise and the sampler's own noise, so sample i does not depend on the batch. noise: unit-variance
        initial noise [n, C, h, w] instead (float32). guidance_scale: None means default_guidance_scale (the folder's
        recommendation, else 4.0 with a null class as diffusers' DiTPipeline, else 1.0); n numbers guide each sample
        by its own scale (one batch, as a server batching requests runs it). output_type: "pil" (list of
        images), "numpy" (float32 [n, H, W, C] in [0, 1]), "tensor" (float32 [n, C, H, W] in [0, 1]) or "raw" (the
        loop's final sample, before decoding). callback(i, t, x_in) runs before network evaluation i (after
        compile(mode="step"): callback(stage, t, state after the stage) between the stages' graphs; refused in
        mode "graph").
        on_non_finite: what to do when the network returned NaN / Inf at some evaluation (checked once, after the
        loop): "raise" (NonFiniteOutput naming the first such evaluation and its timestep) or "retry" (run again
        with a float32 copy of the network when it is in float16 / bfloat16, then raise if that fails too).
        scope(stage, "network" | "solver"): a context manager around each part of each stage (e.g. profiler
        ranges: blitzdiff.profiling.stage_ranges).
        """
        if on_non_finite not in NON_FINITE_POLICIES:
            raise ValueError(f"unknown on_non_finite {on_non_finite!r}; allowed: {', '.join(NON_FINITE_POLICIES)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        positive_int("n", n)
        guidance_scale = guidance_values(self.default_guidance_scale if guidance_scale is None else guidance_scale, n)
        if eta is not None:
            eta = finite_number("eta", eta, minimum=0.0)
        device = self.device
        if device.type == "cpu":
            tune_malloc_once()  # the loop's activations stay resident from step to step (blitzdiff.malloc)
        seed_values = seed_tensor(seeds, n, device)
        shape = self.latent_shape(height, width)
        if noise is None:
            noise = self.initial_noise(seed_values, shape)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n, *shape):
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor of shape {(n, *shape)} (n, channels, height, width), got {got}")
        noise = noise.to(device)
        cond, uncond = self.conditioning(n, class_labels, encoder_hidden_states, negative_encoder_hidden_states,
                                         guidance_scale)
        scale = guidance_scale if isinstance(guidance_scale, float) else torch.tensor(guidance_scale, device=device)
        request = Request(noise, seed_values, cond, uncond, scale, steps, sampler, eta)
        if scope is not None and self.runtime is not None:
            raise ValueError("scope (profiling ranges) runs in the plain eager loop: call it on a pipeline without "
                             "compile()")
        return self.output(self._sample_checked(request, callback, progress, on_non_finite, scope), output_type)

    def batcher(self, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
                bucket: int | None = None, on_batch: Callable[[Any], None] | None = None) -> Any:
        """A blitzdiff.serving.Batcher over this pipeline: concurrent submit(n, **sample_kwargs) requests coalesced
        into runs of at most max_batch rows in one fixed bucket, each request's rows bitwise independent of its
        batch-mates (an uncompiled pipeline is compiled "eager" with buckets=(bucket,))."""
        from ..serving.batcher import Batcher

        return Batcher(self, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, bucket=bucket,
                       on_batch=on_batch)

    def output(self, raw: torch.Tensor, output_type: str):
        """The loop's final samples [n, ...] as sample() returns them for `output_type` (decoded unless "raw");
        tensors contiguous whatever layout the networks' channels-last weights gave them."""
        if output_type == "raw":
            return raw.contiguous()
        images = self.decode(raw)
        if output_type == "tensor":
            return images.contiguous()
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # [n, H, W, C]: a view of channels-last images
        return array if output_type == "numpy" else to_pil(array)

    def _sample_checked(self, request: Request, callback: Callback | None, progress: bool, on_non_finite: str,
                        scope: Scope | None) -> torch.Tensor:
        """The final samples; the network's outputs are checked for NaN / Inf once, after the loop."""
        attempts = [self.model]
        if on_non_finite == "retry" and self.dtype in (torch.float16, torch.bfloat16):
            attempts.append(None)  # built only if needed: a float32 copy of the network, run eagerly
        n = request.noise.shape[0]
        # the bar's total; no plan lookup when there is no bar
        evaluations = self.evaluations(request.steps, request.sampler, request.eta) if progress else 0
        for model in attempts:
            runs = 1 if model is not self.model or self.runtime is None else self.runtime.chunks(n)
            bar = _progress_bar(progress, evaluations * runs)
            try:
                if model is self.model and self.runtime is not None:
                    raw, bad = self.runtime.sample(self, request, callback, bar)
                else:
                    raw, bad = self._sample_eager(model or copy.deepcopy(self.model).float(), request, callback, bar,
                                                  scope)
            finally:
                if bar is not None:
                    bar.close()
            if bad is None:
                return raw
        dtypes = " and then float32" if len(attempts) > 1 else ""
        raise NonFiniteOutput(
            f"the network returned NaN or Inf at evaluation {bad[0]} (timestep {bad[1]:g}) in {self.dtype}{dtypes}; "
            + ("pass on_non_finite='retry' to re-run a half-precision network in float32, or "
               if len(attempts) == 1 and self.dtype != torch.float32 else "") + f"check the weights and inputs ({n} "
            "samples)")

    def _sample_eager(self, model: torch.nn.Module, request: Request, callback: Callback | None, bar: Any,
                      scope: Scope | None) -> tuple[torch.Tensor, tuple[int, float] | None]:
        fn = NetworkCall(self.cpu_network(model), self.kind.prediction_channels, callback, bar)
        raw = sample(fn, request.noise, steps=request.steps, sampler=request.sampler,
                     scheduler_config=self.scheduler_config, guidance_scale=request.guidance_scale, cond=request.cond,
                     uncond=request.uncond, eta=request.eta, seeds=request.seeds, scope=scope)
        n = request.noise.shape[0]
        return raw, fn.first_non_finite(n, n)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """The loop's final sample -> float32 images [n, C, H, W] in [0, 1] (through the VAE for latent models)."""
        x = raw if self.vae is None else self.vae.decode(raw.to(self.vae_dtype))
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def _progress_bar(progress: bool, total: int):
    """A tqdm bar over the run's network evaluations ("20/20 evals" with rate and ETA), left on screen at the end."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="eval", leave=True)


def to_uint8(array):
    """float [n, H, W, C] in [0, 1] -> uint8 [n, H, W, C], rounded to nearest (as the PNGs are written)."""
    return (array * 255).round().astype("uint8")


def uint8_to_pil(images) -> list:
    """uint8 [n, H, W, C] -> n PIL images (grayscale for one channel)."""
    from PIL import Image

    return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]


def to_pil(array) -> list:
    """float [n, H, W, C] in [0, 1] -> n PIL images (grayscale for one channel)."""
    return uint8_to_pil(to_uint8(array))
