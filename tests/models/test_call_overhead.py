"""The embedded models' eager forward makes a bounded number of torch calls.

At batch 1 on the CPU an eager forward of these small networks is mostly per-call cost (a few microseconds per torch
call from Python; `blitzdiff profile` and README "CPU: the default path"), so a call the math does not need is a
slowdown even when it computes nothing: a no-op `.to(dtype)`, a kernel op's argument checks repeating what a module
guarantees. The budgets are the counts after removing those (on "ref": unet-digits 641 -> 284, dit-digits 406 -> 248
calls per forward; on "auto", the default, whose models call the CPU kernels directly: 217 and 126; both with the
q / k / v projections and the DiT's conditioning layers packed, as blitzdiff.load packs them: models.packing), plus
a little headroom. Since then: 285 / 220 and 248 / 127 (the UNets' time projections packed trade 11 linears for 11
slices, which count alike; a prepacked convolution adds a weight check: models.conv). Attribute reads (`.shape`,
`.dtype`) and metadata getters that never reach the dispatcher (`data_ptr`, `stride`, `is_contiguous`, `dim`,
`numel`: 40-150 ns each, as `.shape` takes 87) are free and not counted.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

import blitzdiff
from blitzdiff.models import set_backend

BUDGETS = {("unet-digits", "ref"): 300, ("unet-digits", "auto"): 230,
           ("dit-digits", "ref"): 260, ("dit-digits", "auto"): 135}
FREE = {"__get__", "data_ptr", "stride", "is_contiguous", "dim", "numel"}  # attribute reads, metadata getters


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and Tensor methods called from Python while active (by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name not in FREE:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def forward_inputs(pipe: blitzdiff.Pipeline) -> tuple[torch.Tensor, ...]:
    """One batch-1 evaluation as the sampling loop makes it (a guided DiT evaluates cond and uncond: 2 rows)."""
    config = pipe.model.config
    if pipe.kind.class_conditional:
        rows = 2
        return (torch.randn(rows, config["in_channels"], config["sample_size"], config["sample_size"]),
                torch.full((rows,), 500), torch.tensor([3, pipe.num_classes]))
    return (torch.randn(1, config["in_channels"], config["sample_size"], config["sample_size"]), torch.full((1,), 500))


@pytest.mark.parametrize(("name", "backend"), sorted(BUDGETS))
def test_eager_forward_stays_within_its_call_budget(name: str, backend: str) -> None:
    pipe = blitzdiff.load(name)
    set_backend(pipe.model, backend)
    inputs = forward_inputs(pipe)
    with torch.inference_mode():
        pipe.model(*inputs)  # first call: caches (the DiT's position embedding) fill here
        with CountCalls() as counter:
            out = pipe.model(*inputs)
    assert out.shape[0] == inputs[0].shape[0]
    total = sum(counter.calls.values())
    assert total <= BUDGETS[name, backend], (
        f"{name} on {backend}: {total} torch calls per forward, budget {BUDGETS[name, backend]}; most frequent: "
        f"{counter.calls.most_common(8)}")
