"""Drop-in diffusers pipelines with diffkit's features."""

from .classes import PIPELINES, SUPPORTED
from .loading import DiffusionPipeline, to_diffkit

globals().update(PIPELINES)

__all__ = ["DiffusionPipeline", "PIPELINES", "SUPPORTED", "to_diffkit", *SUPPORTED]
