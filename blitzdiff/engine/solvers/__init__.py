"""The solver table: diffusers scheduler class name -> plan builder `build(config, steps, **options) -> Plan`.

Options a builder accepts are its keyword arguments (e.g. DDIM's `eta`, LCM's custom `timesteps`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..config import SchedulerConfig, frozen
from ..inputs import positive_int
from ..plan import Plan

# class -> "module:function" in this package
BUILDERS: dict[str, str] = {
    "DDIMScheduler": "ddim:ddim",
    "DDPMScheduler": "ddim:ddpm",
    "EulerDiscreteScheduler": "euler:euler",
    "EulerAncestralDiscreteScheduler": "euler:euler_ancestral",
    "HeunDiscreteScheduler": "euler:heun",
    "DPMSolverMultistepScheduler": "dpm_multistep:dpm_multistep",
    "DPMSolverSinglestepScheduler": "dpm_singlestep:dpm_singlestep",
    "UniPCMultistepScheduler": "unipc:unipc",
    "LCMScheduler": "consistency:lcm",
    "CMStochasticIterativeScheduler": "consistency:consistency",
}


@functools.cache
def builder(class_name: str) -> Callable[..., Plan]:
    module, function = BUILDERS[class_name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


@functools.cache
def accepted_options(class_name: str) -> frozenset[str]:
    """The options the class's builder takes: its keyword arguments besides config and steps (read once: the
    signature costs more than looking a plan up in the cache)."""
    return frozenset(inspect.signature(builder(class_name)).parameters) - {"config", "steps"}


_CACHE_SIZE = 64
_plans: OrderedDict[tuple, Plan] = OrderedDict()  # LRU: a plan is a pure function of (config, steps, options)
_plans_lock = threading.Lock()  # Pipelines sample from many threads (tests/engine/test_threads.py)


def build_plan(config: SchedulerConfig, steps: int | None, **options: Any) -> Plan:
    """The plan for `steps` steps of the configured sampler. Options the sampler does not take are an error.

    With explicit `timesteps` (samplers that take them), steps may be None: it is then len(timesteps).
    """
    timesteps = options.get("timesteps")
    if timesteps is not None:
        count = len(timesteps)
        if steps is not None and steps != count:
            raise ValueError(f"steps={steps} but {count} timesteps were given; pass matching counts or only "
                             "timesteps")
        steps = count
    elif steps is None:
        raise ValueError("steps is required (it may be left out only when explicit timesteps are given)")
    positive_int("steps", steps)
    limit = config.fields["num_train_timesteps"]
    if steps > limit:
        raise ValueError(f"steps={steps} exceeds the training schedule (num_train_timesteps={limit}); "
                         f"allowed: 1..{limit}")
    if options:  # every call of a sampling loop looks its plan up: without options, nothing more to check
        accepted = accepted_options(config.class_name)
        extra = sorted(k for k, v in options.items() if v is not None and k not in accepted)
        if extra:
            raise ValueError(f"{config.name} does not take option(s) {extra}; it takes: "
                             f"{sorted(accepted) or 'none'}")
        options = {k: v for k, v in options.items() if v is not None}
    key = (config.key, steps, frozen(options) if options else ())
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    # outside the lock: two threads may both build a new key, same plan
    plan = builder(config.class_name)(config, steps, **options)
    with _plans_lock:
        _plans[key] = plan
        _plans.move_to_end(key)
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan
