"""The diffusers baseline: diffusers' own model class and scheduler on blitzdiff's checkpoint, run by the denoising
loop diffusers' pipelines run, so a benchmark compares the same job done two ways.

The network is diffusers' class named by `pipe.model.diffusers_class`, built from the same config with
`from_config` and given our model's weights (the state-dict key names are diffusers' own: strict loading); the
scheduler is the diffusers class and config that `blitzdiff.engine.config.resolve` derives for the sampler. The
loop follows StableDiffusionPipeline / DiTPipeline: classifier-free guidance as one batched call on
[uncond, cond], `scale_model_input`, the network, the learned-sigma channels dropped, the guidance combination,
`scheduler.step`. diffusers is imported only when a baseline is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..engine.config import resolve


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("the diffusers baseline needs diffusers: pip install diffusers (or benchmark without a "
                          "baseline: --baseline none)") from None
    return diffusers


def diffusers_model(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' twin of one of our networks: its class from our config, our weights (copied), same device and
    dtype, in eval mode."""
    diffusers = import_diffusers()
    parameter = next(model.parameters())
    twin = getattr(diffusers, model.diffusers_class).from_config(dict(model.config)).to(parameter.device).eval()
    if parameter.dtype != torch.float32:  # diffusers builds float32 (and warns on a dtype cast, even a no-op one)
        twin = twin.to(parameter.dtype)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def diffusers_scheduler(sampler: str | None, scheduler_config: Mapping[str, Any]):
    """diffusers' scheduler for `sampler` (None: the config's own class) with the fields blitzdiff resolves."""
    diffusers = import_diffusers()
    resolved = resolve(sampler, scheduler_config)
    return getattr(diffusers, resolved.class_name).from_config(dict(resolved.fields))


class DiffusersSampler:
    """`pipe.sample(n, ..., output_type="raw")` computed by diffusers (see the module docstring).

    compile=True runs the network through `torch.compile` (default options), as users speed up diffusers;
    channels_last=True stores its 4-D weights channels-last first."""

    def __init__(self, pipe, sampler: str | None = None, *, compile: bool = False, channels_last: bool = False):
        self.model = diffusers_model(pipe.model)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if compile else self.model
        self.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
        self.channels = pipe.kind.prediction_channels  # learned-sigma channels beyond these are dropped
        self.null_class = pipe.kind.null_class
        self.device, self.dtype = pipe.device, pipe.dtype

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int,
        noise: torch.Tensor,
        guidance_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final sample [n, C, h, w] from unit noise [n, C, h, w] (the inputs of bench.workload.sample_inputs).
        Latents live in the network's dtype, as in diffusers' pipelines."""
        assert noise.shape[0] == n, (noise.shape, n)
        guided = guidance_scale != 1.0
        cond = {}
        if class_labels is not None:
            labels = class_labels.to(self.device)
            if guided:  # the null class for the unconditional half, as DiTPipeline
                labels = torch.cat([torch.full_like(labels, self.null_class), labels])
            cond["class_labels"] = labels
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.to(self.device, self.dtype)
            if guided:
                text = torch.cat([negative_encoder_hidden_states.to(self.device, self.dtype), text])
            cond["encoder_hidden_states"] = text
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self.network(model_input, t.expand(model_input.shape[0]), **cond).sample
            prediction = prediction[:, : self.channels]
            if guided:
                uncond_prediction, cond_prediction = prediction.chunk(2)
                prediction = uncond_prediction + guidance_scale * (cond_prediction - uncond_prediction)
            latents = scheduler.step(prediction, t, latents).prev_sample
        return latents
