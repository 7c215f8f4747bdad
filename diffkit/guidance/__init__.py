"""Guidance methods: CFG, APG, CFG++ (see :mod:`diffkit.guidance.base` for the interface)."""

from ..noise import SUPPORTED_SCHEDULERS, from_denoised, noise_level, to_denoised, to_epsilon
from .apg import APG
from .base import Guidance, GuidanceOutput, StepContext
from .cfg import CFG, cfg_combine
from .cfgpp import CFGPlusPlus
from .steps import STEP_RULES

__all__ = [
    "APG",
    "CFG",
    "CFGPlusPlus",
    "Guidance",
    "GuidanceOutput",
    "STEP_RULES",
    "SUPPORTED_SCHEDULERS",
    "StepContext",
    "cfg_combine",
    "from_denoised",
    "noise_level",
    "to_denoised",
    "to_epsilon",
]
