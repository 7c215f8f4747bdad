"""diffkit's subclasses of the supported diffusers pipelines.

Each keeps its parent's class name, so ``save_pretrained`` writes a ``model_index.json`` that plain
diffusers loads too. Everything not listed here loads as plain diffusers (see ``loading.py``).
"""

from __future__ import annotations

import diffusers

from ..cache.pipeline import DeepCacheMixin
from ..erasure.pipeline import ErasureMixin
from ..guidance.inversion import InversionMixin
from ..lora import LoraMixin
from ..pruning.pipeline import PruningMixin
from .mixin import GuidanceCallMixin

#: The features every diffkit pipeline has; named in the warning for unsupported pipelines.
FEATURES = ("guidance=", "enable_deepcache", "load_pruning", "load_erasure", "invert", "load_lora_weights")

_MIXINS = (GuidanceCallMixin, DeepCacheMixin, PruningMixin, ErasureMixin, LoraMixin, InversionMixin)

SUPPORTED = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def _subclass(name: str) -> type:
    parent = getattr(diffusers, name)
    doc = f"diffkit's drop-in :class:`diffusers.{name}` (guidance objects, DeepCache, pruning, erasure, LoRA)."
    return type(name, (*_MIXINS, parent), {"__doc__": doc, "__module__": __name__})


PIPELINES: dict[str, type] = {name: _subclass(name) for name in SUPPORTED}
globals().update(PIPELINES)
#: diffusers class -> diffkit class
BY_PARENT: dict[type, type] = {getattr(diffusers, n): c for n, c in PIPELINES.items()}
