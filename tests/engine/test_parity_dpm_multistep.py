"""Multistep DPM-Solver / DPM-Solver++ (ODE and SDE) against diffusers' DPMSolverMultistepScheduler loop: same
config, network and noise -> same final sample (float64).

Every case is compared twice: with diffusers as it ships (relative error < 1e-5), and with diffusers' own step run
in float64 on the same float32 sigma values (`diffusers_loop(..., float64=True)`, relative error < 1e-10), which
shows the plan is diffusers' algorithm up to float64 rounding. As shipped, diffusers computes lambda, h and every
coefficient from its float32 sigma table and truncates the sample to float32 at each step; that alone moves its
result by more than 1e-5 (so only the float64 comparison is asserted) where
- the noise-prediction update (dpmsolver, sde-dpmsolver) weighs the float32 sample by alpha_{i+1} / alpha_i, up to
  sigma_max = 157 (4096 with rescale_betas_zero_snr), and the result is small (thresholding) or sigma_max large;
- float32 h (about 5e-7 absolute against h ~ 0.01) at ~1000 steps: sde-dpmsolver++ and sde-dpmsolver, whose noise
  weights sigma_t * sqrt(1 - exp(-2h)) and sigma_t * sqrt(exp(2h) - 1) carry h's relative error, and exponential
  sigmas.

sde-dpmsolver++ at third order deliberately differs from diffusers (dpm_multistep._step): diffusers' D2 weight has
-0.5 where k-diffusion's sample_dpmpp_3m_sde (Lu's DPM-Solver++(3M) in 2h) has +0.5. Those cases are compared with
diffusers' third-order update corrected by alpha_t * D2 (`fixed_third_order_sde`); test_dpmpp_3m_sde_* show the
divergence from diffusers as shipped, whose O(1) D2 weight blows the sample up at a few hundred steps.
"""

import contextlib
from unittest import mock

import pytest
import torch

import blitzdiff
from blitzdiff.engine.config import resolve
from blitzdiff.engine.solvers import build_plan

from .parity import diffusers_loop, relative_error, toy_network

CLASS = "DPMSolverMultistepScheduler"
STEPS = [1, 2, 3, 5, 7, 10, 25, 50]
SPACINGS = ["linspace", "leading", "trailing"]
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
# (algorithm_type, solver_order, solver_type): every update diffusers has (order 1 ignores solver_type; order 3
# uses it in its second-order warm-up and lower-order-final steps)
VARIANTS = [
    (algorithm, order, solver_type)
    for algorithm in ALGORITHMS
    for order, solver_type in ((1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint"), (3, "heun"))
]
NOISE_PREDICTION = ("dpmsolver", "sde-dpmsolver")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning"),  # diffusers on dpmsolver / sde-dpmsolver
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers on numpy 2
]


@pytest.fixture
def noise():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def fixed_third_order_sde():
    """diffusers' DPMSolverMultistepScheduler with k-diffusion's sign in its sde-dpmsolver++ third-order update:
    diffusers' own x_t plus alpha_t * D2, which turns its D2 weight alpha_t * (... - 0.5) into alpha_t * (... + 0.5)
    (dpm_multistep._step). D2 and alpha_t are recomputed from the same outputs and sigmas, as diffusers' method does;
    other algorithm types are left alone."""
    import diffusers

    cls = diffusers.DPMSolverMultistepScheduler
    third_order_update = cls.multistep_dpm_solver_third_order_update

    def fixed(self, model_output_list, *args, **kwargs):
        x_t = third_order_update(self, model_output_list, *args, **kwargs)
        if self.config.algorithm_type != "sde-dpmsolver++":
            return x_t
        i = self.step_index
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(self.sigmas[i - 1])
        alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(self.sigmas[i - 2])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        lambda_s2 = torch.log(alpha_s2) - torch.log(sigma_s2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        return x_t + alpha_t * 1.0 * D2

    with mock.patch.object(cls, "multistep_dpm_solver_third_order_update", fixed):
        yield


def reference(noise, steps, fields, *, float64=False, stock=False):
    """diffusers' loop on the resolved fields; sde-dpmsolver++ third order with k-diffusion's sign unless stock."""
    third_order_sde = fields.get("algorithm_type") == "sde-dpmsolver++" and fields.get("solver_order") == 3
    with fixed_third_order_sde() if third_order_sde and not stock else contextlib.nullcontext():
        return diffusers_loop(CLASS, fields, toy_network, noise, steps, float64=float64)


def errors(noise, steps, config, sampler=None):
    """blitzdiff's relative error against diffusers as shipped and against diffusers' step in float64, on the
    resolved config (so a sampler name's fixed fields reach diffusers too); for sde-dpmsolver++ third order, against
    diffusers with k-diffusion's sign (`fixed_third_order_sde`) in both."""
    config = {"_class_name": CLASS, **config}
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler=sampler, scheduler_config=config)
    fields = dict(resolve(sampler, config).fields)
    stock = relative_error(ours, reference(noise, steps, fields))
    exact = relative_error(ours, reference(noise, steps, fields, float64=True))
    return stock, exact


def third_order_sde_dpmsolver(algorithm, order, steps, lower_order_final=True):
    """Whether diffusers would take a third-order sde-dpmsolver step, for which it has no update (it fails with
    UnboundLocalError): from step 2 on, except that lower_order_final lowers the last two orders below 15 steps."""
    return algorithm == "sde-dpmsolver" and order == 3 and steps >= (5 if lower_order_final else 3)


def assert_refused(noise, config, steps, match):
    """What diffusers cannot run (it raises IndexError or UnboundLocalError, or returns NaN) is a ValueError that
    says why."""
    config = resolve(None, {"_class_name": CLASS, **config})
    with pytest.raises(ValueError, match=match):
        build_plan(config, steps)
    try:
        sample = diffusers_loop(CLASS, dict(config.fields), toy_network, noise, steps)
    except (IndexError, UnboundLocalError):
        return
    assert sample.isnan().any()


def variant_config(algorithm, order, solver_type):
    # noise prediction needs a nonzero final sigma (config.validate and diffusers both refuse "zero")
    final = "sigma_min" if algorithm in NOISE_PREDICTION else "zero"
    return {"algorithm_type": algorithm, "solver_order": order, "solver_type": solver_type,
            "final_sigmas_type": final}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_matches_diffusers(noise, variant, steps, spacing):
    config = {**variant_config(*variant), "timestep_spacing": spacing, "steps_offset": int(spacing == "leading")}
    if third_order_sde_dpmsolver(*variant[:2], steps):
        assert_refused(noise, config, steps, "no third-order update")
        return
    stock, exact = errors(noise, steps, config)
    assert stock < 1e-5 and exact < 1e-10


OPTIONS = {
    "final-sigma-min": {"final_sigmas_type": "sigma_min"},
    "no-lower-order-final": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final": {"final_sigmas_type": "sigma_min", "euler_at_final": True, "lower_order_final": False},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    "cosine-clipped-trailing": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                                "timestep_spacing": "trailing"},
    "threshold": {"thresholding": True, "sample_max_value": 1.5},
    "v-scaled": {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012},
    "sample": {"prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1},
    "zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "zero-snr-karras": {"rescale_betas_zero_snr": True, "use_karras_sigmas": True},
    "threshold-karras-sample": {"thresholding": True, "use_karras_sigmas": True, "prediction_type": "sample"},
}
# noise prediction weighs diffusers' float32 sample by up to sigma_max (module docstring): as shipped, diffusers is
# 1e-5-accurate only in float64 here
FLOAT32_AMPLIFIED = {"threshold", "zero-snr", "zero-snr-karras", "threshold-karras-sample"}


@pytest.mark.parametrize("steps", [1, 4, 14, 15, 20])
@pytest.mark.parametrize("variant", [("dpmsolver++", 3, "midpoint"), ("sde-dpmsolver++", 2, "heun"),
                                     ("dpmsolver", 3, "heun"), ("sde-dpmsolver", 1, "midpoint"),
                                     ("sde-dpmsolver", 2, "heun")],
                         ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("option", OPTIONS)
def test_options_match_diffusers(noise, option, variant, steps):
    """14 / 15 steps straddle diffusers' lower_order_final threshold (< 15 steps)."""
    config = {**variant_config(*variant), **OPTIONS[option]}
    noise_prediction = variant[0] in NOISE_PREDICTION
    sigmas_end_at_sigma_min = config.get("use_karras_sigmas") or config.get("use_exponential_sigmas")
    if sigmas_end_at_sigma_min and config["final_sigmas_type"] == "sigma_min" and steps >= 15:
        # final_sigmas_type="sigma_min" repeats the last Karras / exponential sigma: a zero-length last step, which
        # diffusers' second-order heun and third-order updates turn into NaN
        if variant[1] == 3 or variant[1:] == (2, "heun"):
            assert_refused(noise, config, steps, "zero-length step")
            return
    stock, exact = errors(noise, steps, config)
    assert exact < 1e-10
    assert stock < 1e-5 or (noise_prediction and option in FLOAT32_AMPLIFIED)


@pytest.mark.parametrize("steps", [1, 3, 10, 25])
@pytest.mark.parametrize("sampler", ["dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sampler_names_match_diffusers(noise, sampler, steps):
    """The names on a Stable Diffusion 1.x scheduler config (PNDM's fields are dropped, as from_config does)."""
    sd_config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                 "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}
    stock, exact = errors(noise, steps, sd_config, sampler=sampler)
    assert stock < 1e-5 and exact < 1e-10


@pytest.mark.parametrize(
    ("config", "steps", "stock_holds"),
    [
        ({}, 999, True),
        ({"solver_order": 3, "use_karras_sigmas": True}, 1000, True),
        ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}, 999, True),
        ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}, 999,
         True),
        ({"solver_order": 1}, 1000, True),
        ({"algorithm_type": "sde-dpmsolver++"}, 999, False),
        ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"}, 999, False),
        ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, 200, True),
        ({"use_exponential_sigmas": True}, 1000, False),
    ],
    ids=["2m", "3m-karras", "dpmsolver-3", "cosine-trailing-zero-length-step", "euler-repeated-timestep", "2m-sde",
         "sde-dpmsolver-2-heun", "3m-sde", "exponential"],
)
def test_many_steps_match_diffusers(noise, config, steps, stock_holds):
    """cosine-trailing ends at timestep -1, whose sigma repeats timestep 0's (a zero-length midpoint step, the
    identity in diffusers); at 1000 linspace steps one timestep repeats (a zero-length first-order step). Where
    stock_holds is False, diffusers' float32 h alone moves its result by more than 1e-5 (module docstring)."""
    stock, exact = errors(noise, steps, config)
    assert exact < 1e-10
    assert stock < 1e-5 or not stock_holds


@pytest.mark.parametrize(
    ("config", "steps", "match"),
    [
        ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 10, "repeat the first timestep"),
        ({"rescale_betas_zero_snr": True, "use_karras_sigmas": True}, 40, "repeat the first timestep"),
        ({"timestep_spacing": "leading"}, 1000, "repeat the first timestep"),
        ({"timestep_spacing": "leading", "steps_offset": 1}, 999, "zero-length step"),
        ({}, 1000, "zero-length step"),
        ({"solver_type": "heun", "timestep_spacing": "trailing", "lambda_min_clipped": -5.1,
          "beta_schedule": "squaredcos_cap_v2"}, 999, "zero-length step"),
    ],
    ids=["cosine-karras", "zero-snr-karras", "leading", "leading-offset", "linspace", "cosine-trailing-heun"],
)
def test_refused_schedules(noise, config, steps, match):
    assert_refused(noise, config, steps, match)


def dpmpp_3m_sde(noise, steps, **reference_kwargs):
    """(blitzdiff's sample, diffusers' sample) for dpmpp_3m_sde on its resolved config."""
    fields = dict(resolve("dpmpp_3m_sde", {"_class_name": CLASS}).fields)
    ours = blitzdiff.sample(toy_network, noise, steps=steps, sampler="dpmpp_3m_sde", scheduler_config=fields)
    return ours, reference(noise, steps, fields, **reference_kwargs)


def test_dpmpp_3m_sde_differs_from_stock_diffusers(noise):
    """The deliberate divergence (module docstring): diffusers as shipped, with its -0.5, is far from blitzdiff (a
    relative difference of 0.31 here), which matches the sign-corrected diffusers to float32 rounding."""
    ours, stock = dpmpp_3m_sde(noise, 25, stock=True)
    assert relative_error(ours, stock) > 1e-4
    assert relative_error(ours, dpmpp_3m_sde(noise, 25)[1]) < 1e-5


def test_dpmpp_3m_sde_is_stable_at_many_steps(noise):
    """At 500 steps blitzdiff's sample stays the size of its 25-step sample (and is the sign-corrected diffusers' in
    float64), where diffusers as shipped amplifies D2 to a norm of ~4e14."""
    ours, fixed = dpmpp_3m_sde(noise, 500, float64=True)
    assert torch.isfinite(ours).all() and relative_error(ours, fixed) < 1e-10
    assert 0.5 < ours.norm() / dpmpp_3m_sde(noise, 25)[0].norm() < 2.0
    stock = dpmpp_3m_sde(noise, 500, stock=True)[1]
    assert not torch.isfinite(stock).all() or stock.norm() > 1e6 * ours.norm()


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize(("steps", "lower_order_final"), [(5, True), (20, True), (3, False), (10, False)])
def test_third_order_sde_dpmsolver_is_refused(noise, solver_type, steps, lower_order_final):
    """diffusers' multistep_dpm_solver_third_order_update has no sde-dpmsolver branch; below 5 steps with
    lower_order_final it never takes a third-order step, and those runs are compared above."""
    assert third_order_sde_dpmsolver("sde-dpmsolver", 3, steps, lower_order_final)
    config = {**variant_config("sde-dpmsolver", 3, solver_type), "lower_order_final": lower_order_final}
    assert_refused(noise, config, steps, "no third-order update")


@pytest.mark.parametrize("option", ["default", "no-lower-order-final", "euler-at-final", "threshold", "zero-snr"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_history_is_solver_order_deep(variant, option):
    """Noise prediction reads eps_{i-1}, eps_{i-2} from the kept evaluation points: every plan keeps exactly
    solver_order estimates, however many steps it has."""
    fields = {"_class_name": CLASS, **variant_config(*variant), **OPTIONS.get(option, {})}
    steps, expected = 200, variant[1]
    if third_order_sde_dpmsolver(*variant[:2], steps):  # refused past 4 steps: its plans take orders 1, 2, 2, 1
        fields["lower_order_final"] = True
        steps, expected = 4, 2
    assert build_plan(resolve(None, fields), steps).history == expected


def test_plan_structure():
    plan = build_plan(resolve("dpmpp_2m"), 10)
    assert not plan.stochastic and plan.integer_timesteps and plan.init_scale == plan.output_scale == 1.0
    assert [s.timestep for s in plan.stages] == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    last = plan.stages[-1].update  # first order to sigma = 0: exactly the newest denoised estimate
    assert (last.x, last.denoised, last.noise) == (0.0, (1.0,), 0.0)
    assert build_plan(resolve("dpmpp_3m_sde"), 10).stochastic
