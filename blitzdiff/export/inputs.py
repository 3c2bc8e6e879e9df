"""The inputs of an exported graph, described by data (as Optimum's ONNX configs do): each input's name, dtype, shape
(symbols for the dynamic dims: "batch", and "height" / "width" of a UNet exported with a size range) and an example
tensor, and the torch.export dims that make those symbols dynamic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .precision import dtype_name

TOKENS = 77  # prompt length of the exported encoder_hidden_states (CLIP's)
SIZED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")  # networks that take any multiple of their down-sampling


@dataclass(frozen=True)
class Size:
    """The dynamic height and width of an exported UNet, in latent pixels: (min, max) each, multiples of `multiple`
    (2 ** the number of down-sampling stages: each halves the feature maps, and the up path adds them back)."""

    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int

    def example(self, axis: int, preferred: int) -> int:
        """An example size in the range: `preferred` (the model's sample size) where it fits, never one block when
        the range allows two (torch.export specializes a dim of size 1)."""
        low, high = (self.height, self.width)[axis]
        m = self.multiple
        return min(max(preferred // m, low // m, 2), high // m) * m

    def manifest(self) -> dict[str, Any]:
        return {"height": list(self.height), "width": list(self.width), "multiple": self.multiple}


def check_size(pipe: Any, what: str, size: Any) -> Size | None:
    """`size` ((height_min, height_max), (width_min, width_max)) in latent pixels, checked against the network."""
    if size is None:
        return None
    model = pipe.model
    if what != "denoiser":
        raise ValueError(f"size (dynamic height / width) applies to what='denoiser', not {what!r}; export the {what} "
                         "at the model's sample size (size=None)")
    if model.diffusers_class not in SIZED_CLASSES:
        raise ValueError(f"{model.diffusers_class} takes no dynamic size: its position table is fixed at its sample "
                         f"size {model.config['sample_size']}; export it with size=None (dynamic sizes: "
                         f"{', '.join(SIZED_CLASSES)})")
    stages = len(model.config["block_out_channels"]) - 1
    m = 2**stages
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in r) for r in size)
          and all(m <= low <= high and low % m == 0 and high % m == 0 for low, high in size))
    if not ok:
        raise ValueError(f"size must be ((height_min, height_max), (width_min, width_max)) in latent pixels, each a "
                         f"multiple of {m} (the {stages} down-sampling stages of this {model.diffusers_class}) with "
                         f"{m} <= min <= max; got {size!r}")
    (h_low, h_high), (w_low, w_high) = size
    return Size((h_low, h_high), (w_low, w_high), m)


def spec(name: str, example: torch.Tensor, symbols: dict[int, str] | None = None) -> dict[str, Any]:
    """An input: name, dtype, shape (dims listed in `symbols` named, the others fixed) and its example tensor."""
    symbols = {0: "batch"} if symbols is None else symbols
    shape = [symbols.get(axis, n) for axis, n in enumerate(example.shape)]
    return {"name": name, "dtype": dtype_name(example.dtype), "shape": shape, "example": example}


def input_specs(pipe: Any, what: str, batch: int, guided: bool, dtype: torch.dtype, size: Size | None
                ) -> list[dict[str, Any]]:
    """The graph's inputs in order. Network inputs (sample, latent_sample, encoder_hidden_states) are in the export's
    dtype; timestep stays float32 (in float16, fractional timesteps near 1000 would round to 0.5; blitzdiff's loop
    passes float32 or int64); the loop's state (noise) and guidance_scale are float32, as in Pipeline."""
    channels, h, w = pipe.latent_shape(None, None)
    device, kind = pipe.device, pipe.kind
    generator = torch.Generator().manual_seed(0)
    spatial = {0: "batch"}
    if size is not None:
        h, w = size.example(0, h), size.example(1, w)
        spatial = {0: "batch", 2: "height", 3: "width"}
    if what == "vae":
        return [spec("latent_sample", torch.randn(batch, channels, h, w, generator=generator).to(device, dtype))]
    specs = []
    if what == "denoiser":
        specs += [spec("sample", torch.randn(batch, channels, h, w, generator=generator).to(device, dtype), spatial),
                  spec("timestep", torch.linspace(900, 100, batch).to(device))]
    else:
        specs += [spec("noise", torch.randn(batch, channels, h, w, generator=generator).to(device)),
                  spec("seeds", torch.arange(batch, dtype=torch.int64, device=device))]
    if kind.class_conditional:
        specs.append(spec("class_labels", torch.arange(batch, dtype=torch.int64, device=device) % pipe.num_classes))
    if kind.text_conditional:
        width = pipe.model.config["cross_attention_dim"]
        prompt = torch.randn(batch, TOKENS, width, generator=generator).to(device, dtype)
        specs.append(spec("encoder_hidden_states", prompt))
        if what == "loop" and guided:
            specs.append(spec("negative_encoder_hidden_states", torch.zeros_like(prompt)))
    if what == "loop" and guided:
        specs.append(spec("guidance_scale", torch.tensor(4.0, device=device), {}))
    return specs


def dynamic_shapes(specs: list[dict[str, Any]], batch: tuple[int, int], size: Size | None) -> dict[str, Any]:
    """torch.export's dynamic_shapes for the specs' symbols: Dim("batch"), and height / width as multiples of the
    size's multiple (derived dims: `multiple * Dim("height_blocks")`), so the graph holds no other sizes."""
    dims: dict[str, Any] = {}
    if batch[0] < batch[1]:
        dims["batch"] = torch.export.Dim("batch", min=batch[0], max=batch[1])
    for axis, name in enumerate(("height", "width")):
        if size is None:
            continue
        low, high = (size.height, size.width)[axis]
        if low < high:
            blocks = torch.export.Dim(f"{name}_blocks", min=low // size.multiple, max=high // size.multiple)
            dims[name] = blocks if size.multiple == 1 else size.multiple * blocks
    return {s["name"]: ({axis: dims[symbol] for axis, symbol in enumerate(s["shape"]) if symbol in dims} or None)
            for s in specs}
