"""Plan.memo: what a loop derives from its plan is computed once per plan and shared by later runs, and never kept
while torch traces (a traced value, e.g. with a symbolic batch, belongs to the graph)."""

import numpy as np
import pytest
import torch

from blitzdiff.engine.config import resolve
from blitzdiff.engine.denoiser import Denoiser
from blitzdiff.engine.fused_step import fused_stages
from blitzdiff.engine.solvers import build_plan


def make(plan, batch=2, guidance=1.0):
    return Denoiser(lambda x, t: x, plan, "epsilon", batch=batch, device="cpu", guidance_scale=guidance)


def test_runs_of_one_plan_share_what_it_derives():
    plan = build_plan(resolve("dpmpp_2m", {}), 6)
    first, second = make(plan), make(plan)
    assert second.scalars is first.scalars and second.timesteps is first.timesteps
    assert fused_stages(plan, second, None) is fused_stages(plan, first, None)
    guided = make(plan, guidance=3.0)  # twice the rows: its own timesteps; the scale is read per call
    assert guided.timesteps is not first.timesteps and guided.timesteps[0].shape == (4,)
    assert fused_stages(plan, guided, None) is fused_stages(plan, first, None)
    assert make(plan, batch=3).timesteps[0].shape == (3,)
    # another plan (another step count) derives its own
    assert make(build_plan(resolve("dpmpp_2m", {}), 7)).scalars is not first.scalars


def test_nothing_is_kept_while_tracing():
    plan = build_plan(resolve("ddim", {}), 3)

    def traced(x):
        return x * plan.memo("traced", lambda: 2.0)

    assert torch.compile(traced, fullgraph=True)(torch.ones(2)).tolist() == [2.0, 2.0]
    assert plan.memo("traced", lambda: 5.0) == 5.0  # computed now, eagerly: the traced call kept nothing


@pytest.mark.parametrize("kind", ["list", "numpy", "tensor"])
def test_a_plan_follows_its_config_not_a_list_mutated_after_it(kind):
    """A config's plan-cache key is computed once, from the fields it holds: a sequence (trained_betas) is copied into
    a tuple, so changing the caller's list afterwards changes neither the config nor the plan it looks up."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    given = {"list": betas.tolist(), "numpy": betas.numpy().copy(), "tensor": betas.clone()}[kind]
    config = resolve("ddim", {"trained_betas": given})
    given[0] = 0.5  # the caller's object, changed after resolve
    assert config.fields["trained_betas"] == tuple(betas.tolist())
    assert build_plan(config, 10) == build_plan(resolve("ddim", {"trained_betas": betas.tolist()}), 10)
    altered = resolve("ddim", {"trained_betas": [0.5, *betas.tolist()[1:]]})
    assert config.key != altered.key and build_plan(altered, 10) != build_plan(config, 10)


@pytest.mark.parametrize("value", [np.float32(2e-4), torch.tensor(2e-4), np.float64(2e-4)])
def test_numpy_and_tensor_scalars_in_a_config_are_their_python_values(value):
    """A field given as a numpy or 0-d tensor scalar (as read from arrays) is kept as its Python value: the config and
    its plan are those of that number (building the plan-cache key used to iterate over the scalar and fail)."""
    config = resolve("ddim", {"beta_start": value})
    plain = resolve("ddim", {"beta_start": float(value)})
    assert config.fields["beta_start"] == float(value) and config.key == plain.key
    assert build_plan(config, 10) == build_plan(plain, 10)
