"""Guidance methods: CFG, APG, CFG++ (see :mod:`diffkit.guidance.base` for the interface)."""

from .base import Guidance, GuidanceOutput, StepContext
from .cfg import CFG, cfg_combine

__all__ = ["CFG", "Guidance", "GuidanceOutput", "StepContext", "cfg_combine"]
