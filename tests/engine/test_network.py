"""blitzdiff.engine.network.NetworkCall: the `fn(x, t, **cond)` every Pipeline path (eager and the compiled runtime)
hands the loop, tested on fake networks whose output channels carry known values.

A learned-sigma network returns [prediction; variance] along the channels; NetworkCall keeps the leading `channels`
ones (diffusers' pipelines do `out[:, :in_channels]`). Each output's per-row finiteness is recorded as a device tensor;
`first_non_finite` reads it once, counting only the rows that hold real samples (not bucket padding).
"""

from __future__ import annotations

import torch

from blitzdiff.engine.network import NetworkCall, first_non_finite


class Channels(torch.nn.Module):
    """out[:, j] = x[:, j % C] + 100 * j for 2C output channels (a learned-sigma layout): every channel known."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype))  # NetworkCall reads the model's dtype here
        self.seen: list[tuple[torch.dtype, torch.Tensor, dict]] = []

    def forward(self, x, t, **cond):
        self.seen.append((x.dtype, t, cond))
        offsets = 100 * torch.arange(2 * x.shape[1], dtype=x.dtype).reshape(1, -1, 1, 1)
        return torch.cat([x, x], dim=1) + offsets


def test_returns_the_prediction_channels_and_drops_the_variance():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])
    labels = torch.tensor([1, 7])
    model = Channels()
    out = NetworkCall(model, 3)(x, t, class_labels=labels)
    expected = x + torch.tensor([0.0, 100.0, 200.0]).reshape(1, 3, 1, 1)  # channels 0, 1, 2 of Channels' output
    assert torch.equal(out, expected)
    _, seen_t, seen_cond = model.seen[0]
    assert seen_t is t and seen_cond.keys() == {"class_labels"} and seen_cond["class_labels"] is labels


def test_runs_the_model_in_its_dtype_and_returns_the_loops():
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    model = Channels(torch.bfloat16)
    out = NetworkCall(model, 2)(x, torch.tensor([5]))
    assert model.seen[0][0] == torch.bfloat16 and out.dtype == torch.float32
    expected = (x.bfloat16() + torch.tensor([0.0, 100.0], dtype=torch.bfloat16).reshape(1, 2, 1, 1)).float()
    assert torch.equal(out, expected)


class Poisoned(torch.nn.Module):
    """Identity network whose output rows `bad_rows` are NaN at evaluation `bad_at` (counting from 0)."""

    def __init__(self, bad_at: int, bad_rows: list[int]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.bad_at, self.bad_rows, self.calls = bad_at, bad_rows, 0

    def forward(self, x, t, **cond):
        out = x.clone()
        if self.calls == self.bad_at:
            out[self.bad_rows] = float("nan")
        self.calls += 1
        return out


def run(model: torch.nn.Module, rows: int, evaluations: int, **kwargs) -> NetworkCall:
    call = NetworkCall(model, 2, **kwargs)
    for k in range(evaluations):
        call(torch.zeros(rows, 2, 2, 2), torch.full((rows,), 900.0 - 100 * k))
    return call


def test_first_non_finite_names_the_evaluation_and_ignores_padding():
    call = run(Poisoned(bad_at=2, bad_rows=[3]), rows=4, evaluations=4)
    assert call.flags().shape == (4, 4) and call.flags().sum().item() == 15
    assert call.first_non_finite(4, 4) == (2, 700.0)
    assert call.first_non_finite(4, 3) is None  # row 3 is padding of a bucket of 4 holding 3 samples
    # Guided: rows are [uncond; cond] of a batch of 2; row 3 is sample 1's conditional copy.
    guided = run(Poisoned(bad_at=1, bad_rows=[3]), rows=4, evaluations=3)
    assert guided.first_non_finite(2, 2) == (1, 800.0)
    assert guided.first_non_finite(2, 1) is None
    assert first_non_finite(guided.flags(), torch.stack(guided.timesteps), 2, 1) is None
    guided.reset()
    assert guided.finite == [] and guided.timesteps == []


def test_callback_and_progress_per_evaluation():
    class Bar:
        count = 0

        def update(self, n):
            self.count += n

    seen, bar = [], Bar()
    run(Poisoned(bad_at=-1, bad_rows=[]), rows=1, evaluations=3, callback=lambda i, t, x: seen.append((i, t.item())),
        progress=bar)
    assert seen == [(0, 900.0), (1, 800.0), (2, 700.0)] and bar.count == 3
