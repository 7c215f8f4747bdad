"""CFG++ (Chung, Kim, Park, Nam, Ye, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models", ICLR 2025).

CFG extrapolates with a scale w > 1 and re-noises with the guided noise, which pushes samples off the
data manifold. CFG++ interpolates, ``eps_lambda = eps_u + lambda (eps_c - eps_u)`` with ``lambda`` in [0, 1],
forms the denoised estimate with ``eps_lambda`` and re-noises with the *unconditional* ``eps_u`` (the
paper's DDIM sampler, eta = 0):

    x0 = (x_t - sqrt(1 - a_t) eps_lambda) / sqrt(a_t);   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_u.

The guidance object returns both predictions; the scheduler-specific step lives in
:mod:`diffkit.guidance.steps`. ``lambda`` 0.6-0.8 behaves like CFG 7.5-12.5; ``lambda = 0`` is
unconditional sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Guidance, GuidanceOutput, StepContext, check_range
from .cfg import cfg_combine


@dataclass(frozen=True)
class CFGPlusPlus(Guidance):
    """CFG++ with ``scale`` = lambda in [0, 1]: ``pred = u + lambda (c - u)`` forms D, ``renoise_pred = u`` re-noises.

    Works on the model's own prediction type (epsilon or v; the interpolation is linear, so D and eps
    formed from the interpolated v equal the interpolated D and eps).
    """

    scale: float = 0.6

    def __post_init__(self):
        object.__setattr__(self, "scale", check_range("scale", self.scale, low=0.0, high=1.0))

    def __call__(self, pred_uncond, pred_cond, ctx: StepContext, state: dict) -> GuidanceOutput:
        return GuidanceOutput(pred=cfg_combine(pred_uncond, pred_cond, self.scale), renoise_pred=pred_uncond)
