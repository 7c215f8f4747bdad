"""Guidance as a per-call lifecycle feature: run a diffusers call with a diffkit guidance object.

diffusers' SD/SDXL loops evaluate the U-Net on the batch ``[uncond, cond]``, combine the halves with
``u + s (c - u)`` and hand the result to ``scheduler.step``. For the duration of one call the feature
``"guidance"`` (touches the U-Net forward and the scheduler step; stage "call")

1. registers a ``ModelHook`` on the U-Net that takes the two halves, keeps them for the step, and
   returns ``[c, c]``, so that diffusers' own combination yields ``c + s * 0 = c`` exactly; and
2. wraps ``scheduler.step`` on this scheduler instance (same signature, so diffusers passes ``eta`` and
   ``generator`` as before) to apply the guidance rule to the kept halves, with the scheduler, timestep
   and sample at hand, and to take the step (the scheduler's own, or a rule for two predictions).

diffusers' callback protocol is followed: the pipeline's ``guidance_scale`` reads the guidance
object's scale, and when a callback turns classifier-free guidance off mid-call (``SDCFGCutoffCallback``
sets ``pipe._guidance_scale = 0``; diffusers then runs the conditional batch alone) the hook and the
step pass the U-Net's output through untouched, exactly as diffusers does. Whether the batch holds
two halves is read from the pipeline (``do_classifier_free_guidance``), never guessed from its size.

A guidance object with ``begin_call(pipe)`` (:class:`diffkit.guidance.diffusers_guiders.DiffusersGuidance`,
the adapter of ``diffusers.guiders``) gets a per-call session that also sees the U-Net's inputs: before
each evaluation it plans the step (the guider's ``set_state``) and may extend the batch with rows its
perturbation applies to (PAG, SEG, SkipLayer); after it, it splits the output into the unconditional,
conditional and perturbed predictions; the step combines them with the guider's ``forward``.

Everything else (encoding, latents, callbacks, decode) stays diffusers' own. Both are removed when
the call ends, also on error.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..guidance.base import Guidance, StepContext
from ..guidance.steps import step_rule_for
from ..lifecycle import FeatureKind, Touch, register_feature

HOOK_NAME = "diffkit.guidance"
_OFF = object()  # the U-Net ran without the unconditional half (guidance turned off by a callback)


class _GuidedStep:
    """Per-call state: the U-Net's pending halves and the guidance rule's own memory."""

    def __init__(self, guidance: Guidance, pipe, session=None):
        self.guidance = guidance
        self._pipe = weakref.ref(pipe)
        self.scheduler = pipe.scheduler
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        self.pending = None
        self.session = session  # a guidance object's per-call session (diffusers guiders), or None
        self.state: dict = {} if session is None else {"session": session}
        self.steps = 0

    def guiding(self) -> bool:
        pipe = self._pipe()
        return pipe is None or bool(pipe.do_classifier_free_guidance)

    def before(self, args, kwargs):
        """The U-Net's inputs, as the session wants them (unchanged without one or while not guiding)."""
        if self.session is None or not self.guiding():
            return args, kwargs
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return self.session.before_unet(args, kwargs, self.steps, timestep)

    def take(self, output: torch.Tensor) -> torch.Tensor:
        if not self.guiding():
            self.pending = _OFF
            return output
        if self.session is not None:
            uncond, cond = self.session.after_unet(output)
            self.pending = (uncond, cond)
            return torch.cat([cond, cond])
        if output.shape[0] % 2:
            raise RuntimeError("diffkit guidance expected the U-Net batch [uncond, cond]; got an odd batch")
        uncond, cond = output.chunk(2)
        self.pending = (uncond, cond)
        return torch.cat([cond, cond])

    def step(self, real_step, model_output, timestep, sample, *args, **kwargs):
        if self.pending is None:
            raise RuntimeError("scheduler.step was called without a U-Net evaluation before it")
        pending, self.pending = self.pending, None
        if pending is _OFF:
            self.steps += 1
            return real_step(model_output, timestep, sample, *args, **kwargs)
        uncond, cond = pending
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

    def pre_forward(self, module, *args, **kwargs):
        return self.guided.before(args, kwargs)

    def post_forward(self, module, output):
        if isinstance(output, tuple):
            return (self.guided.take(output[0]), *output[1:])
        output.sample = self.guided.take(output.sample)
        return output


@dataclass
class GuidedCall:
    guided: _GuidedStep
    unet: object
    scheduler: object


def _attach(pipe, guidance: Guidance) -> GuidedCall:
    scheduler, unet = pipe.scheduler, pipe.unet
    begin = getattr(guidance, "begin_call", None)
    session = begin(pipe) if callable(begin) else None  # all-or-nothing: it hooks nothing when it fails
    guided = _GuidedStep(guidance, pipe, session)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    try:
        registry.register_hook(_SplitHook(guided), HOOK_NAME)
    except BaseException:
        if session is not None:
            session.close()
        raise
    real_step = scheduler.step

    @functools.wraps(real_step)
    def step(model_output, timestep, sample, *args, **kwargs):
        return guided.step(real_step, model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step  # instance attribute: shadows the class method for this call only
    return GuidedCall(guided, unet, scheduler)


def _detach(pipe, state: GuidedCall) -> None:
    state.scheduler.__dict__.pop("step", None)
    state.unet._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    if state.guided.session is not None:
        state.guided.session.close()


GUIDANCE = register_feature(FeatureKind(
    "guidance", Touch.UNET_FORWARD | Touch.SCHEDULER_STEP, "call", _attach, _detach, describe=repr,
))
