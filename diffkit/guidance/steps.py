"""Scheduler step rules for guidance results that carry a separate re-noising prediction (CFG++).

A plain guidance result (one prediction) goes through the scheduler's own ``step``. A result with
``renoise_pred`` needs a rule that knows the scheduler's update: it forms the denoised estimate from
``pred`` and steps to the next noise level with ``renoise_pred``. Rules are registered per scheduler
class name; :func:`step_rule_for` raises a ``ValueError`` listing the supported schedulers.

A rule is ``rule(scheduler, real_step, out, ctx, step_kwargs) -> prev_sample``. ``real_step`` is the
scheduler's own bound ``step``, which rules may call to keep the scheduler's internal bookkeeping
(step index, multistep history) exactly as diffusers keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

STEP_RULES: dict[str, Callable] = {}


def register_step_rule(*scheduler_names: str):
    def deco(fn):
        for name in scheduler_names:
            STEP_RULES[name] = fn
        return fn

    return deco


def step_rule_for(scheduler, guidance_name: str = "this guidance") -> Callable:
    name = type(scheduler).__name__
    if name in STEP_RULES:
        return STEP_RULES[name]
    supported = ", ".join(sorted(STEP_RULES)) or "none"
    raise ValueError(
        f"{guidance_name} re-noises with a separate prediction and needs a step rule for the scheduler; "
        f"{name} has none. Supported schedulers: {supported}."
    )
