"""Singlestep DPM-Solver / DPM-Solver++ (2S, 3S, SDE) against diffusers' DPMSolverSinglestepScheduler loop: same
config, network and noise -> same final sample (float64)."""

import contextlib
import logging
from unittest import mock

import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import SAMPLERS, resolve
from blitzdiff.engine.solvers import build_plan
from blitzdiff.engine.solvers.common import dpm_schedule
from blitzdiff.engine.solvers.dpm_singlestep import order_list

from . import parity
from .parity import diffusers_loop, relative_error, toy_network

CLASS = "DPMSolverSinglestepScheduler"
STEPS = [1, 2, 3, 4, 5, 6, 7, 10, 25, 50]
# (algorithm_type, final_sigmas_type, lower_order_final); lower_order_final=False only survives diffusers'
# set_timesteps with a nonzero final sigma and steps divisible by the order
ENDINGS = [
    ("dpmsolver++", "zero", False), ("dpmsolver++", "sigma_min", False), ("dpmsolver++", "sigma_min", True),
    ("sde-dpmsolver++", "zero", True), ("sde-dpmsolver++", "sigma_min", False),
    ("dpmsolver", "sigma_min", False), ("dpmsolver", "sigma_min", True),
]


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    """diffusers logs a warning each time its set_timesteps turns lower_order_final on."""
    logger = logging.getLogger("diffusers.schedulers.scheduling_dpmsolver_singlestep")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def diffusers_scheduler(config: dict, steps: int):
    import diffusers

    scheduler = diffusers.DPMSolverSinglestepScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


@contextlib.contextmanager
def singlestep_noise(config: dict, steps: int):
    """diffusers draws SDE noise at every step. A step that ends inside a singlestep only makes the next evaluation's
    point, so blitzdiff draws that noise from the next stage's point stream 2(k+1) instead of the update stream
    2k+1 that parity.diffusers_loop hands out; remap those streams (the order list says which steps they are)."""
    orders = diffusers_scheduler(config, steps).order_list
    to_point = {2 * k + 1: 2 * k + 2 for k in range(steps - 1) if orders[k + 1] > 1}
    gaussian = parity.gaussian

    def remapped(seeds, stream, shape, dtype):
        return gaussian(seeds, to_point.get(stream, stream), shape, dtype)

    with mock.patch.object(parity, "gaussian", remapped):
        yield


def reference(config: dict, noise: torch.Tensor, steps: int, *, exact: bool = False, **kwargs) -> torch.Tensor:
    """diffusers' loop; exact=True in float64 arithmetic on the same float32 sigma values: diffusers keeps its sigmas
    in float32, so every coefficient of its step is a float32 scalar (parity.float64_arithmetic)."""
    with singlestep_noise(config, steps):
        return diffusers_loop(CLASS, config, toy_network, noise, steps, float64=exact, **kwargs)


def ours(config: dict, noise: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    return blitzdiff.sample(toy_network, noise, steps=steps, scheduler_config={"_class_name": CLASS, **config},
                            **kwargs)


def float32_tolerance(config: dict) -> float:
    """How close diffusers' float32 coefficients let its own loop come to the exact one (measured, with margin).

    Two cases cancel catastrophically in float32: SDE-DPM-Solver++ 3S heun weighs D2 by (1 - e^-2h - 2h) / (2h)^2
    - 1/2 (diffusers drifts up to ~2e-4 from its float64 self at 50 steps), and DPM-Solver with a v / sample model
    converts the data prediction to eps = (x - alpha * x0) / sigma, whose x terms cancel in the update against
    alpha_t / alpha_s ~ 150 (up to ~7e-5).
    """
    f = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 2, "prediction_type": "epsilon",
         **config}
    if (f["algorithm_type"], f["solver_type"], f["solver_order"]) == ("sde-dpmsolver++", "heun", 3):
        return 1e-3
    if f["algorithm_type"] == "dpmsolver" and f["prediction_type"] != "epsilon":
        return 1e-3
    return 1e-5


def assert_parity(config: dict, noise: torch.Tensor, steps: int, **kwargs) -> None:
    """The plan is diffusers' math (to rounding, against its loop in float64) and matches diffusers as shipped."""
    result = ours(config, noise, steps, **kwargs)
    assert relative_error(result, reference(config, noise, steps, exact=True, **kwargs)) < 1e-10
    assert relative_error(result, reference(config, noise, steps, **kwargs)) < float32_tolerance(config)


SCHEDULE_CONFIGS = [
    {}, {"final_sigmas_type": "sigma_min"}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True},
]


@pytest.mark.parametrize("config", SCHEDULE_CONFIGS, ids=["default", "sigma-min", "karras", "exponential",
                                                          "cosine-clipped", "scaled-karras"])
def test_schedule_matches_set_timesteps(config):
    """Timesteps and sigmas bit-identical to diffusers' (exponential timesteps are truncated, Karras rounded)."""
    for steps in [*STEPS, 333, 999]:
        scheduler = diffusers_scheduler(config, steps)
        timesteps, sigmas = dpm_schedule(resolve(None, {"_class_name": CLASS, **config}), steps)
        assert timesteps.tolist() == scheduler.timesteps.tolist()
        assert sigmas.tolist() == scheduler.sigmas.double().tolist()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_order_list_matches_diffusers(order, final, lower_order_final):
    config = {"solver_order": order, "final_sigmas_type": final, "lower_order_final": lower_order_final}
    for steps in range(1, 16):
        expected = diffusers_scheduler(config, steps).order_list
        assert order_list(resolve(None, {"_class_name": CLASS, **config}), steps) == expected


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(("order", "solver_type"), [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint"),
                                                    (3, "heun")])
@pytest.mark.parametrize("ending", ENDINGS, ids=["-".join(map(str, e)) for e in ENDINGS])
def test_matches_diffusers(noise, ending, order, solver_type, steps):
    algorithm, final, lower_order_final = ending
    config = {"algorithm_type": algorithm, "final_sigmas_type": final, "lower_order_final": lower_order_final,
              "solver_order": order, "solver_type": solver_type}
    assert_parity(config, noise, steps)


OPTION_CONFIGS = {
    "v-scaled": {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012},
    "sample": {"prediction_type": "sample"},
    "threshold": {"thresholding": True, "sample_max_value": 1.5},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    "trained-betas": {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
}
OPTION_ALGORITHMS = {"dpmsolver++": {}, "sde-dpmsolver++": {}, "dpmsolver": {"final_sigmas_type": "sigma_min"}}


@pytest.mark.parametrize("steps", [1, 4, 7, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm", OPTION_ALGORITHMS)
@pytest.mark.parametrize("option", OPTION_CONFIGS)
def test_options_match_diffusers(noise, option, algorithm, order, steps):
    if algorithm == "dpmsolver" and option == "threshold":
        pytest.skip("diffusers fails on thresholding with dpmsolver; blitzdiff refuses it (tested below)")
    config = {**OPTION_CONFIGS[option], "algorithm_type": algorithm, "solver_order": order,
              "solver_type": "heun" if steps % 2 else "midpoint", **OPTION_ALGORITHMS[algorithm]}
    assert_parity(config, noise, steps)


@pytest.mark.parametrize("steps", [1, 3, 4, 10, 25])
@pytest.mark.parametrize("name", ["dpm_solver_singlestep", "dpmpp_2s", "dpmpp_3s"])
def test_sampler_names_match_diffusers(noise, name, steps):
    class_name, fixed = SAMPLERS[name]
    assert class_name == CLASS
    result = blitzdiff.sample(toy_network, noise, steps=steps, sampler=name)
    assert relative_error(result, ours(fixed, noise, steps)) == 0.0
    assert_parity(fixed, noise, steps)


def test_spacing_fields_of_other_classes_are_dropped(noise):
    """The class has one fixed spacing; like diffusers' from_config, a multistep config's spacing is ignored."""
    config = {"timestep_spacing": "trailing", "steps_offset": 1, "solver_order": 3}
    assert_parity(config, noise, 9)
    assert relative_error(ours(config, noise, 9), ours({"solver_order": 3}, noise, 9)) == 0.0


def test_aliased_values_match_diffusers(noise):
    """diffusers' __init__ rewrites DEIS / UniPC values to dpmsolver++ / midpoint (it refuses deis with a zero final
    sigma, checking the value before the rewrite; blitzdiff's config accepts it)."""
    config = {"algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min", "solver_order": 3}
    assert_parity(config, noise, 9)


def test_sde_noise_is_per_sample_and_matches_with_seeds(noise):
    config = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    seeds = torch.tensor([7, 123])
    assert_parity(config, noise, 10, seeds=seeds)
    result = ours(config, noise, 10, seeds=seeds)
    assert relative_error(result, ours(config, noise, 10)) > 1e-3  # the noise is really drawn
    alone = ours(config, noise[1:], 10, seeds=seeds[1:])  # sample 1 does not depend on the batch around it
    assert torch.equal(alone[0], result[1])


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("ending", ENDINGS, ids=["-".join(map(str, e)) for e in ENDINGS])
def test_history_is_bounded(ending, order, solver_type):
    """A singlestep reads only its own group's estimates: at most solver_order, at any number of steps."""
    algorithm, final, lower_order_final = ending
    config = {"_class_name": CLASS, "algorithm_type": algorithm, "final_sigmas_type": final,
              "lower_order_final": lower_order_final, "solver_order": order, "solver_type": solver_type}
    assert build_plan(resolve(None, config), 200).history == order


def test_plan_holds_the_group_start_inside_a_singlestep():
    """dpmpp_3s, 7 steps: orders [1, 2, 3, 1, 2, 3, 1]; only the last evaluation of each singlestep moves the state,
    the others are evaluated at intermediate points built from the state and the group's estimates."""
    plan = build_plan(resolve("dpmpp_3s"), 7)
    assert [s.update is not None for s in plan.stages] == [False, False, True, False, False, True, True]
    assert [s.point is not None for s in plan.stages] == [False, True, True, False, True, True, False]
    assert [len(s.point.denoised) for s in plan.stages if s.point is not None] == [1, 2, 1, 2]
    assert plan.history == 3 and not plan.stochastic and plan.integer_timesteps
    sde = build_plan(resolve("dpmpp_3s", algorithm_type="sde-dpmsolver++"), 7)
    assert [s.point.noise != 0 for s in sde.stages if s.point is not None] == [True] * 4


@pytest.mark.parametrize(
    ("overrides", "steps", "match"),
    [
        ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True}, 5, "thresholding"),
        ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 5, "sde-dpmsolver"),
        ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": 0.0}, 1000, "repeat the first timestep"),
        ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 998, "repeat the noise level"),
    ],
    ids=["dpmsolver-threshold", "sde-dpmsolver", "duplicate-first-timestep", "repeated-sigma"],
)
def test_configs_diffusers_cannot_run_are_refused(overrides, steps, match):
    with pytest.raises(ValueError, match=match):
        build_plan(resolve("dpmpp_2s", **overrides), steps)
