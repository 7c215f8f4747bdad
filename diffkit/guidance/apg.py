"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of High
Guidance Scales in Diffusion Models", ICLR 2025).

The paper writes CFG on the denoised estimate, ``D_w = D_c + (w - 1) (D_c - D_u)``, and changes the update
``diff = D_c - D_u`` in three ways (its Algorithm 1 gives the whole rule as code):

1. reverse momentum: ``a <- diff + beta a`` with ``beta < 0``, ``a`` starting at 0, and
   ``diff <- a``;
2. rescaling: ``diff <- diff * min(1, r / ||diff||)``, the norm per sample over all non-batch
   dimensions, skipped when ``r = 0``;
3. projection onto D_c: ``diff_par = (<diff, D_c> / ||D_c||^2) D_c``, ``diff_orth = diff - diff_par``
   and ``D_APG = D_c + (w - 1) (diff_orth + eta diff_par)``.

With ``eta = 1``, ``r = 0`` and ``beta = 0`` this is CFG with scale ``w``. The paper's Algorithm 1 computes
the projection in float64; so does :func:`project`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..noise import from_denoised, noise_level, to_denoised
from .base import Guidance, GuidanceOutput, StepContext, check_range

SPACES = ("denoised", "epsilon")


def _non_batch_dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.ndim))


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v0`` into its parts parallel and orthogonal to ``v1``, per sample (the paper's decomposition).

    ``v0_par = (<v0, v1> / ||v1||^2) v1`` and ``v0_orth = v0 - v0_par``, inner products over all non-batch
    dimensions, computed in float64 and returned in ``v0``'s dtype.
    """
    dims = _non_batch_dims(v0)
    a, b = v0.double(), v1.double()
    unit = torch.nn.functional.normalize(b, dim=dims)
    parallel = (a * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = a - parallel
    return parallel.to(v0.dtype), orthogonal.to(v0.dtype)


def momentum_update(diff: torch.Tensor, state: dict, momentum: float) -> torch.Tensor:
    """Reverse momentum: ``a <- diff + beta * a`` with ``a = 0`` at the first step; returns ``a``.

    The running average lives in ``state["running_average"]`` (one pipeline call's state).
    """
    previous = state.get("running_average")
    average = diff if previous is None else diff + momentum * previous
    state["running_average"] = average
    return average


def rescale(diff: torch.Tensor, norm_threshold: float) -> torch.Tensor:
    """Bound the update's norm: ``diff * min(1, r / ||diff||)`` per sample; ``r = 0``: unchanged."""
    if norm_threshold <= 0:
        return diff
    norm = diff.norm(p=2, dim=_non_batch_dims(diff), keepdim=True)
    return diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)


def normalized_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float, eta: float,
                        norm_threshold: float, momentum: float, state: dict) -> torch.Tensor:
    """The APG rule on any pair of predictions (the paper applies it to D; Algorithm 1):

    ``D_c + (w - 1) (diff_orth + eta diff_par)`` with ``diff`` after momentum and rescaling.
    """
    diff = pred_cond - pred_uncond
    if momentum != 0:
        diff = momentum_update(diff, state, momentum)
    diff = rescale(diff, norm_threshold)
    parallel, orthogonal = project(diff, pred_cond)
    return pred_cond + (scale - 1) * (orthogonal + eta * parallel)


@dataclass(frozen=True)
class APG(Guidance):
    """Adaptive projected guidance, ``pipe(prompt, guidance=APG(scale=15))``.

    Args:
        scale: w in diffusers' convention (1 = no guidance); ``APG(w, eta=1, norm_threshold=0, momentum=0)``
            is ``CFG(w)``.
        eta: weight of the update's part parallel to D_c, in [0, 1] (the paper recommends 0).
        norm_threshold: r, the bound on the update's norm (0 disables rescaling).
        momentum: beta in (-1, 1); the paper's reverse momentum is negative.
        space: ``"denoised"`` (the paper: the rule acts on D, converted from and to the model's prediction
            with the scheduler's coefficients at that step) or ``"epsilon"`` (the rule acts on the model's
            prediction directly, as ``diffusers.guiders.AdaptiveProjectedGuidance`` does).

    The defaults ``eta=0, norm_threshold=15, momentum=-0.5`` are the paper's settings for Stable Diffusion XL
    (its Table 10, the values diffusers adopted); the paper uses ``eta = 0`` and negative momentum for all
    models, and r is the knob to tune per model (smaller latents give smaller update norms).

    ``space="epsilon"`` equals ``AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True,
    adaptive_projected_guidance_momentum=momentum, adaptive_projected_guidance_rescale=norm_threshold,
    eta=eta)``: diffusers writes the result as ``pred_c + guidance_scale * update`` in that mode and uses the
    same momentum recursion ``a <- diff + beta a``.
    """

    scale: float = 15.0
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    space: str = "denoised"

    def __post_init__(self):
        object.__setattr__(self, "scale", check_range("scale", self.scale, low=0.0))
        object.__setattr__(self, "eta", check_range("eta", self.eta, low=0.0, high=1.0))
        object.__setattr__(self, "norm_threshold", check_range("norm_threshold", self.norm_threshold, low=0.0))
        object.__setattr__(
            self, "momentum", check_range("momentum", self.momentum, low=-1.0, high=1.0, low_open=True, high_open=True)
        )
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")

    @property
    def needs_unconditional(self) -> bool:
        return self.scale != 1.0

    def __call__(self, pred_uncond, pred_cond, ctx: StepContext, state: dict) -> GuidanceOutput:
        rule = dict(scale=self.scale, eta=self.eta, norm_threshold=self.norm_threshold, momentum=self.momentum,
                    state=state)
        if self.space == "epsilon":
            return GuidanceOutput(normalized_guidance(pred_cond, pred_uncond, **rule))
        # The conversions run in float32 (half-precision x0 at high noise loses digits); the result is cast back.
        level, sample, kind = noise_level(ctx.scheduler, ctx.timestep), ctx.sample.float(), ctx.prediction_type
        d_uncond = to_denoised(pred_uncond.float(), sample, level, kind)
        d_cond = to_denoised(pred_cond.float(), sample, level, kind)
        d_guided = normalized_guidance(d_cond, d_uncond, **rule)
        return GuidanceOutput(from_denoised(d_guided, sample, level, kind).to(pred_cond.dtype))
