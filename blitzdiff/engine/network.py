"""The network as the loop calls it: dtype casts, learned-sigma split, finiteness flags, progress and callback.

`NetworkCall` is the `fn(x, t, **cond)` a Pipeline hands to the loop (blitzdiff.engine.denoiser.Denoiser). It records
each output's per-row finiteness as a device tensor (no host sync per step); `first_non_finite` reads them once,
after the loop, for the rows that hold real samples (bucket padding is ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (evaluation index, timestep [B'], model input)


class NonFiniteOutput(RuntimeError):
    """The network returned NaN or Inf during sampling."""


class NetworkCall:
    """fn(x, t, **cond) for the loop: the model (a torch module, or an external network: blitzdiff.engine.runtime's
    EXTERNAL_MODES) in its own dtype, the prediction channels only (learned sigma split off, as diffusers pipelines
    do), returned in the loop's dtype. Progress and callback live here, outside the sampler's loop. `finite` holds
    one bool [B'] per evaluation (B' = B, or 2B with guidance)."""

    def __init__(self, model: Any, channels: int, callback: Callback | None = None, progress: Any = None):
        self.network, self.channels, self.callback, self.progress = model, channels, callback, progress
        self.model = for_run(model)
        self.dtype = network_dtype(model)
        self.finite: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []  # 0-d, one per evaluation

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if self.callback is not None:
            self.callback(len(self.finite), t, x)
        out = self.model(x.to(self.dtype), t, **cond)[:, : self.channels]
        self.finite.append(torch.isfinite(out).flatten(1).all(1))
        self.timesteps.append(t[0])
        if self.progress is not None:
            self.progress.update(1)
        return out.to(x.dtype)

    def reset(self) -> None:
        """Forget the recorded flags (before another run of the same loop), which starts a new run of the network."""
        self.finite, self.timesteps = [], []
        self.model = for_run(self.network)

    def flags(self) -> torch.Tensor:
        """bool [evaluations, B'] (device tensor; no sync)."""
        return torch.stack(self.finite)

    def first_non_finite(self, batch: int, rows: int) -> tuple[int, float] | None:
        """(evaluation index, its timestep) of the first network output that is non-finite in one of the first
        `rows` samples of the (padded) batch of `batch`, or None; one host sync."""
        return first_non_finite(self.flags(), torch.stack(self.timesteps), batch, rows)


def for_run(model: Any) -> Any:
    """What one run of the loop calls for `model`: the CPU graphs' run (CpuGraphs.run: each graph checked once a run),
    else the model itself."""
    from .cpu_graph import CpuGraphs  # cpu_graph imports this module

    return model.run() if isinstance(model, CpuGraphs) else model


def network_dtype(model: Any) -> torch.dtype:
    """The dtype a network takes its sample in: its parameters' (a torch module), or its own `dtype` (an external
    network: ONNX Runtime, TensorRT)."""
    return model.dtype if not isinstance(model, torch.nn.Module) else next(model.parameters()).dtype


def first_non_finite(flags: torch.Tensor, timesteps: torch.Tensor, batch: int, rows: int) -> tuple[int, float] | None:
    """flags: bool [E, copies * batch] (guided: [uncond; cond]); timesteps [E]. Only the first `rows` samples of
    each copy count: the rest is bucket padding, whose values never reach a real sample."""
    flags = flags.cpu()
    ok = flags.reshape(flags.shape[0], -1, batch)[:, :, :rows].flatten(1).all(1)  # [E]
    if bool(ok.all()):
        return None
    index = int((~ok).nonzero()[0, 0])
    return index, float(timesteps[index].cpu())
