"""Guidance methods: CFG, APG, CFG++ (see :mod:`diffkit.guidance.base` for the interface), and diffusers'
guiders through :class:`DiffusersGuidance` (:mod:`diffkit.guidance.diffusers_guiders`)."""

from ..noise import SUPPORTED_SCHEDULERS, from_denoised, noise_level, to_denoised, to_epsilon
from .apg import APG
from .base import Guidance, GuidanceOutput, StepContext
from .cfg import CFG, cfg_combine
from .cfgpp import CFGPlusPlus
from .diffusers_guiders import DiffusersGuidance
from .steps import STEP_RULES

__all__ = [
    "APG",
    "CFG",
    "CFGPlusPlus",
    "DiffusersGuidance",
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
