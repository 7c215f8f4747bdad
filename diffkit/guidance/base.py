"""The guidance interface: how two U-Net predictions become the update a sampler uses.

A guidance object is immutable configuration. For each denoising step it receives the unconditional
and conditional predictions (in the model's own prediction type, epsilon or v) together with a
:class:`StepContext` (scheduler, timestep, current sample), plus a per-call ``state`` dict for methods
that carry memory across steps (APG's momentum). State is created fresh for every pipeline call.

It returns a :class:`GuidanceOutput` holding up to two predictions:

* ``pred`` forms the denoised estimate (this is all CFG and APG need);
* ``renoise_pred``, when not ``None``, is the prediction the sampler re-noises with to reach the next
  noise level (CFG++ re-noises with the unconditional prediction). A scheduler needs a step rule for
  that; see :mod:`diffkit.guidance.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GuidanceOutput:
    pred: torch.Tensor
    renoise_pred: torch.Tensor | None = None


@dataclass
class StepContext:
    """What a guidance rule may know about the current step, beyond the two predictions.

    ``sample`` is the scheduler's (unscaled) current sample x_t, ``timestep`` the scheduler timestep,
    ``prediction_type`` the model's parameterisation ("epsilon", "v_prediction" or "sample").
    """

    scheduler: Any
    timestep: Any
    sample: torch.Tensor
    prediction_type: str
    step: int = 0  # index of this scheduler step within the pipeline call


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Validate a numeric hyper-parameter, raising ``ValueError`` naming it, its value and the range."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bad = value != value  # NaN
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return value


class Guidance:
    """Base class. Subclasses are frozen dataclasses and implement :meth:`__call__`."""

    #: The value a plain ``guidance_scale=`` would need to agree with this object (None: none does).
    scale: float

    @property
    def needs_unconditional(self) -> bool:
        """Whether the unconditional prediction is needed (False: diffusers' single-batch path)."""
        return True

    def __call__(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, ctx: StepContext,
                 state: dict) -> GuidanceOutput:  # pragma: no cover - interface
        raise NotImplementedError
