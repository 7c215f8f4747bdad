"""Classifier-free guidance (Ho & Salimans 2022), in diffusers' convention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Guidance, GuidanceOutput, StepContext, check_range


def cfg_combine(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u): CFG with weight w as diffusers writes it (w = 1: no guidance)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


@dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance: ``pred_u + scale * (pred_c - pred_u)``.

    ``CFG(s)`` gives exactly the latents of diffusers' ``guidance_scale=s`` (same operations in the same
    order). ``scale <= 1`` with ``scale == 1`` is conditional-only sampling, which, like diffusers, skips
    the unconditional batch; ``0 <= scale < 1`` interpolates towards the unconditional prediction.
    """

    scale: float = 7.5

    def __post_init__(self):
        object.__setattr__(self, "scale", check_range("scale", self.scale, low=0.0))

    @property
    def needs_unconditional(self) -> bool:
        return self.scale != 1.0

    def __call__(self, pred_uncond, pred_cond, ctx: StepContext, state: dict) -> GuidanceOutput:
        return GuidanceOutput(cfg_combine(pred_uncond, pred_cond, self.scale))
