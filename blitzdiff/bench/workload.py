"""The job both sides of a benchmark run: the same initial noise and conditioning for n samples of one pipeline."""

from __future__ import annotations

from typing import Any

import torch

from ..profiling import prompt_embeddings


def sample_inputs(pipe, n: int, guidance_scale: float, *, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of `pipe.sample(n, steps=..., **inputs)` that the diffusers baseline takes too: unit
    initial noise [n, C, h, w] (float32, drawn on the CPU from `seed`, so every device gets the same numbers), class
    labels 0, 1, ... cycling (class-conditional models), random prompt embeddings (text-conditional models: see
    blitzdiff.profiling.prompt_embeddings) and the guidance scale."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *pipe.latent_shape(None, None)), generator=generator).to(pipe.device)
    inputs: dict[str, Any] = {"noise": noise, "guidance_scale": guidance_scale}
    if pipe.kind.class_conditional:
        inputs["class_labels"] = (torch.arange(n) % pipe.num_classes).to(pipe.device)
    embeddings = prompt_embeddings(pipe, n, guidance_scale, seed=seed + 1)
    inputs.update({name: tensor.to(pipe.device, pipe.dtype) for name, tensor in embeddings.items()})
    return inputs
