"""Run a diffusers pipeline call with a diffkit guidance object, without copying its denoising loop.

diffusers' SD/SDXL loops evaluate the U-Net on the batch ``[uncond, cond]``, combine the halves with
``u + s (c - u)`` and hand the result to ``scheduler.step``. For the duration of one call we

1. register a ``ModelHook`` on the U-Net that takes the two halves, keeps them for the step, and
   returns ``[c, c]``, so that diffusers' own combination yields ``c + s * 0 = c`` exactly; and
2. wrap ``scheduler.step`` on this scheduler instance (same signature, so diffusers passes ``eta`` and
   ``generator`` as before) to apply the guidance rule to the kept halves, with the scheduler, timestep
   and sample at hand, and to take the step (the scheduler's own, or a rule for two predictions).

Everything else (encoding, latents, callbacks, decode) stays diffusers' own. Both are removed when
the call ends, also on error.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..guidance.base import Guidance, StepContext
from ..guidance.steps import step_rule_for

HOOK_NAME = "diffkit.guidance"


class _GuidedStep:
    """Per-call state: the U-Net's pending halves and the guidance rule's own memory."""

    def __init__(self, guidance: Guidance, scheduler):
        self.guidance = guidance
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state: dict = {}
        self.steps = 0

    def take(self, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] % 2:
            raise RuntimeError("diffkit guidance expected the U-Net batch [uncond, cond]; got an odd batch")
        uncond, cond = output.chunk(2)
        self.pending = (uncond, cond)
        return torch.cat([cond, cond])

    def step(self, real_step, model_output, timestep, sample, *args, **kwargs):
        if self.pending is None:
            raise RuntimeError("scheduler.step was called without a U-Net evaluation before it")
        uncond, cond = self.pending
        self.pending = None
        ctx = StepContext(self.scheduler, timestep, sample, self.prediction_type, self.steps)
        out = self.guidance(uncond, cond, ctx, self.state)
        self.steps += 1
        if out.renoise_pred is None:
            return real_step(out.pred, timestep, sample, *args, **kwargs)
        rule = step_rule_for(self.scheduler, type(self.guidance).__name__)
        return_dict = kwargs.pop("return_dict", True)
        prev = rule(self.scheduler, real_step, out, ctx, kwargs)
        if return_dict:
            return _StepOutput(prev_sample=prev)
        return (prev,)


class _StepOutput(dict):
    """Minimal stand-in for the schedulers' output dataclasses (attribute and key access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class _SplitHook(ModelHook):
    def __init__(self, guided: _GuidedStep):
        super().__init__()
        self.guided = guided

    def post_forward(self, module, output):
        if isinstance(output, tuple):
            return (self.guided.take(output[0]), *output[1:])
        output.sample = self.guided.take(output.sample)
        return output


@contextmanager
def guided_call(pipe, guidance: Guidance):
    """Context manager attaching ``guidance`` to ``pipe``'s U-Net and scheduler for one call."""
    scheduler, unet = pipe.scheduler, pipe.unet
    guided = _GuidedStep(guidance, scheduler)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.register_hook(_SplitHook(guided), HOOK_NAME)
    real_step = scheduler.step

    @functools.wraps(real_step)
    def step(model_output, timestep, sample, *args, **kwargs):
        return guided.step(real_step, model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step  # instance attribute: shadows the class method for this call only
    try:
        yield guided
    finally:
        del scheduler.step
        registry.remove_hook(HOOK_NAME, recurse=False)
