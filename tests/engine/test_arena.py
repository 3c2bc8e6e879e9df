"""The arena of a CPU graph (blitzdiff.engine.arena, cpu_graph): buffers alive at the same time never share memory,
and buffers that are not do; checked against the lifetimes directly, and on recorded forwards."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from blitzdiff.engine import cpu_graph
from blitzdiff.engine.arena import ALIGNMENT, Lifetime, plan_arena
from blitzdiff.engine.cpu_graph import CpuGraph, CpuGraphs

from .test_cpu_graph import CONFIGS, call, inputs, tiny_model


def overlapping_in_time(a: Lifetime, b: Lifetime) -> bool:
    return a.birth <= b.death and b.birth <= a.death


@pytest.mark.parametrize("seed", range(20))
def test_buffers_alive_together_never_share_bytes(seed):
    rng = random.Random(seed)
    lifetimes = []
    for birth in sorted(rng.randrange(60) for _ in range(rng.randrange(1, 50))):
        lifetimes.append(Lifetime(rng.randrange(1, 5000), birth, birth + rng.randrange(0, 15)))
    offsets, size = plan_arena(lifetimes)
    spans = [(offset, offset + life.nbytes) for offset, life in zip(offsets, lifetimes, strict=True)]
    assert all(offset % ALIGNMENT == 0 for offset in offsets) and max(end for _, end in spans) <= size
    for i, (a, (a_start, a_end)) in enumerate(zip(lifetimes, spans, strict=True)):
        for b, (b_start, b_end) in zip(lifetimes[i + 1:], spans[i + 1:], strict=True):
            if overlapping_in_time(a, b):
                assert a_end <= b_start or b_end <= a_start, (a, b, (a_start, a_end), (b_start, b_end))
    assert size <= sum(-(-life.nbytes // ALIGNMENT) * ALIGNMENT for life in lifetimes)


def test_a_chain_of_buffers_takes_two_slots():
    """Each buffer read only by the next step (a chain of elementwise ops): two buffers' memory, whatever the
    length."""
    lifetimes = [Lifetime(1000, k, k + 1) for k in range(10)]
    offsets, size = plan_arena(lifetimes)
    assert set(offsets) == {0, 1024} and size == 2048


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_graph_keeps_a_fraction_of_the_forwards_buffers(name):
    """A recorded forward's buffers share an arena: a third or less of what they take each in its own allocation
    (dit-digits' guided batch-8 forward: 33.1 MiB -> 2.6 MiB), and the replay still equals the eager forward."""
    model, x = tiny_model(name), inputs(name)
    planned = []
    original = cpu_graph.plan_arena

    def spy(lifetimes):
        offsets, size = original(lifetimes)
        planned.append((sum(life.nbytes for life in lifetimes), size))
        return offsets, size

    cpu_graph.plan_arena = spy
    try:
        with torch.no_grad():
            graph = CpuGraph(model, x, max_bytes=2**30)
            assert torch.equal(graph.replay(x), call(model, x))
    finally:
        cpu_graph.plan_arena = original
    ((unplanned, size),) = planned
    assert graph.bytes == size and 3 * size <= unplanned, (size, unplanned)


class _Changing(nn.Module):
    """A forward that makes one more buffer each call: the two recordings of a capture differ."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, sample, timestep):
        self.calls += 1
        y = self.proj(sample)
        for _ in range(self.calls):
            y = y * 2
        return y


def test_a_forward_that_changes_between_recordings_stays_eager():
    model = _Changing()
    graphs = CpuGraphs(model)
    x = {"sample": torch.randn(2, 4), "timestep": torch.tensor([1, 2])}
    with torch.no_grad():
        graphs(**x)
    assert graphs.stats()[0]["refused"] == "the forward made other buffers when recorded again"
