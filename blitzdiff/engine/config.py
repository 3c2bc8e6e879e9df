"""Scheduler configuration: diffusers' `scheduler_config.json` fields, resolved and validated once.

A sampler is a diffusers scheduler class plus its config fields. Sampler *names* are presets: a class and the
fields that name fixes. Resolution follows diffusers' `from_config`: the chosen class's defaults, then the given
config's fields that the class knows, then the name's fixed fields, then the caller's explicit overrides. Fields
that belong to another known diffusers scheduler are dropped (as from_config drops them); anything else is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon",
}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_CLIP = {"clip_sample": True, "clip_sample_range": 1.0}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
_DPM = {
    **_COMMON, "solver_order": 2, **_THRESHOLD, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    **_SIGMAS, **_FLOW, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
}

# The __init__ defaults of each supported diffusers scheduler class (a test checks them against diffusers).
CLASS_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "DDIMScheduler": {
        **_COMMON, **_CLIP, "set_alpha_to_one": True, "steps_offset": 0, **_THRESHOLD,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "DDPMScheduler": {
        **_COMMON, "variance_type": "fixed_small", **_CLIP, **_THRESHOLD, "timestep_spacing": "leading",
        "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "EulerDiscreteScheduler": {
        **_COMMON, "interpolation_type": "linear", **_SIGMAS, "sigma_min": None, "sigma_max": None,
        "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_COMMON, "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        **_COMMON, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMAS, "clip_sample": False,
        "clip_sample_range": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
    },
    "DPMSolverMultistepScheduler": {
        **_DPM, "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
        "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "DPMSolverSinglestepScheduler": {**_DPM, "lower_order_final": False},
    "UniPCMultistepScheduler": {
        **_COMMON, "solver_order": 2, **_THRESHOLD, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, **_SIGMAS, **_FLOW,
        "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None,
    },
    "LCMScheduler": {
        **_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, **_CLIP, "clip_sample": False, "set_alpha_to_one": True,
        "steps_offset": 0, **_THRESHOLD, "timestep_spacing": "leading", "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    },
    "CMStochasticIterativeScheduler": {
        "num_train_timesteps": 40, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "s_noise": 1.0,
        "rho": 7.0, "clip_denoised": True,
    },
}

# Fields of diffusers schedulers we do not run (PNDM is Stable Diffusion 1.x's default): dropped on a class change.
_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
_FOREIGN_FIELDS = frozenset({"skip_prk_steps", "s_churn", "s_tmin", "s_tmax"})

# Fields whose non-default value changes the math in a way blitzdiff does not implement: refused, never ignored.
_UNSUPPORTED_VALUES: Mapping[str, tuple[Any, ...]] = {
    "use_beta_sigmas": (False,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
    "use_lu_lambdas": (False,), "solver_p": (None,), "shift_terminal": (None,),
}

# Values diffusers' __init__ silently rewrites (so a DPM-Solver config can be loaded into UniPC and back):
# class -> field -> {given value: the value diffusers registers}.
_DPM_ALIASES = {"algorithm_type": {"deis": "dpmsolver++"},
                "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}
_ALIASES: Mapping[str, Mapping[str, Mapping[Any, Any]]] = {
    "DPMSolverMultistepScheduler": _DPM_ALIASES,
    "DPMSolverSinglestepScheduler": _DPM_ALIASES,
    "UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
}

# name -> (diffusers class, the fields the name fixes)
SAMPLERS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpm_solver_singlestep": (
        "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "consistency": ("CMStochasticIterativeScheduler", {}),
}
DEFAULT_SAMPLER = "dpmpp_2m"


def _python(value: Any) -> Any:
    """Arrays, tensors and numpy scalars as their Python values (`tolist`: a list, or a scalar for 0-d ones)."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, int, float)) else value


def frozen(value: Any) -> Any:
    """A hashable stand-in for config / option values (lists, dicts, arrays)."""
    if value is None or isinstance(value, (str, int, float)):  # most fields: skip the failing hasattr lookups
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    value = _python(value)
    return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _immutable(value: Any) -> Any:
    """Lists, tuples and arrays (numpy, torch) as tuples of their Python values, numpy / 0-d scalars as Python
    scalars; anything else as it is."""
    value = _python(value)
    return tuple(_immutable(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler class with every one of its fields resolved (defaults filled in)."""

    class_name: str
    fields: Mapping[str, Any]
    key: tuple = dataclasses.field(init=False, repr=False, compare=False)  # (class_name, fields), hashable: plan caches

    def __post_init__(self) -> None:
        # Sequence values (trained_betas, ...) become tuples, so that the key, computed once here, stays the fields'.
        fields = MappingProxyType({k: _immutable(v) for k, v in self.fields.items()})
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "key", (self.class_name, frozen(fields)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.class_name} has no field {name!r}") from None

    @property
    def name(self) -> str:
        """The most specific sampler name whose fixed fields this config matches."""
        matches = [
            (len(fixed), name) for name, (cls, fixed) in SAMPLERS.items()
            if cls == self.class_name and all(self.fields.get(k) == v for k, v in fixed.items())
        ]
        return max(matches)[1] if matches else self.class_name


def read_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """A scheduler config as a dict, from a dict, a scheduler_config.json, or a folder holding one."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"scheduler config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"scheduler config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"scheduler config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def resolve(
    sampler: str | None = None,
    scheduler_config: Mapping[str, Any] | str | Path | None = None,
    **overrides: Any,
) -> SchedulerConfig:
    """The scheduler to run: from a sampler name, a diffusers config, or both (the name wins over the config's
    class; explicit `overrides` win over everything). Raises ValueError on unknown names, unknown fields or
    contradictory / unsupported values."""
    given = read_config(scheduler_config)
    config_class = given.pop("_class_name", None)
    # An in-memory diffusers config (scheduler.config) lists in `_use_default_values` the fields its owner never
    # set; diffusers' from_config drops them so that another class keeps its own defaults (e.g. DDIM's "leading"
    # timestep_spacing does not leak into DPM-Solver's "linspace"). A saved scheduler_config.json has no such list.
    implicit = set(given.get("_use_default_values") or ())
    given = {k: v for k, v in given.items() if not k.startswith("_") and k not in implicit}
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        class_name, fixed = SAMPLERS[sampler]
    elif config_class is not None:
        if config_class not in CLASS_DEFAULTS:
            raise ValueError(
                f"scheduler class {config_class!r} is not supported; pass sampler= one of {', '.join(SAMPLERS)} "
                f"(supported classes: {', '.join(CLASS_DEFAULTS)})"
            )
        class_name, fixed = config_class, {}
    else:
        class_name, fixed = SAMPLERS[DEFAULT_SAMPLER]
    defaults = CLASS_DEFAULTS[class_name]
    known = set().union(*CLASS_DEFAULTS.values()) | _FOREIGN_FIELDS
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown scheduler config field(s) {unknown}; known fields: {sorted(known)}")
    bad_overrides = sorted(set(overrides) - set(defaults))
    if bad_overrides:
        raise ValueError(f"{class_name} has no field(s) {bad_overrides}; its fields: {sorted(defaults)}")
    fields = {**defaults, **{k: v for k, v in given.items() if k in defaults}, **fixed, **overrides}
    for field, aliases in _ALIASES.get(class_name, {}).items():
        if isinstance(fields[field], str) and fields[field] in aliases:
            fields[field] = aliases[fields[field]]
    config = SchedulerConfig(class_name, MappingProxyType(fields))
    validate(config)
    return config


def _choice(config: SchedulerConfig, field: str, allowed: tuple[Any, ...]) -> None:
    if field in config.fields and config.fields[field] not in allowed:
        raise ValueError(
            f"{config.class_name}: {field}={config.fields[field]!r} is not supported; allowed: "
            f"{', '.join(map(repr, allowed))}"
        )


def validate(config: SchedulerConfig) -> None:
    """Reject unsupported or contradictory field values with a message naming the field and the allowed values."""
    f = config.fields
    for field, allowed in _UNSUPPORTED_VALUES.items():
        _choice(config, field, allowed)
    _choice(config, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
    _choice(config, "prediction_type", ("epsilon", "v_prediction", "sample"))
    _choice(config, "timestep_spacing", ("linspace", "leading", "trailing"))
    _choice(config, "final_sigmas_type", ("zero", "sigma_min"))
    _choice(config, "interpolation_type", ("linear", "log_linear"))
    _choice(config, "timestep_type", ("discrete", "continuous"))
    _choice(config, "algorithm_type", ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"))
    _choice(config, "solver_order", (1, 2, 3))
    if config.class_name == "UniPCMultistepScheduler":
        _choice(config, "solver_type", ("bh1", "bh2"))
    else:
        _choice(config, "solver_type", ("midpoint", "heun"))
    if config.class_name == "DDPMScheduler":
        _choice(config, "variance_type", _DDPM_VARIANCES)
    else:
        # DPM-Solver's variance_type only acts when "learned" / "learned_range" (it then splits the network's
        # variance channels off); a DDPM folder's fixed_* value carried over by from_config is inert there.
        _choice(config, "variance_type", (None, *_DDPM_VARIANCES))
    if sum(bool(f.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
        raise ValueError(f"{config.class_name}: use_karras_sigmas and use_exponential_sigmas are exclusive; "
                         "set at most one")
    if f.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver") and f.get("final_sigmas_type") == "zero":
        raise ValueError(f"{config.class_name}: final_sigmas_type='zero' is not supported with algorithm_type="
                         f"{f['algorithm_type']!r} (its noise-prediction update is undefined at sigma=0); use "
                         "final_sigmas_type='sigma_min'")
    if f.get("trained_betas") is not None and len(f["trained_betas"]) != f["num_train_timesteps"]:
        raise ValueError(f"{config.class_name}: trained_betas has {len(f['trained_betas'])} entries but "
                         f"num_train_timesteps={f['num_train_timesteps']}")
    if not (isinstance(f["num_train_timesteps"], int) and f["num_train_timesteps"] >= 1):
        raise ValueError(f"num_train_timesteps must be a positive int, got {f['num_train_timesteps']!r}")
