"""The shapes world: a deterministic synthetic domain for the reference model and its oracle.

One object on a plain background with four factors (object, color, style, background) plus random
position, size and rotation; captions with synonyms, one evaluation-only synonym per concept, and a
held-out set of (object, color, style) combinations never shown to the diffusion model.
"""

from .captions import N_TEMPLATES, caption, prompt_for, word_for
from .render import ShapeSpec, object_mask, render, sample_spec
from .world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    EVAL_ONLY,
    FACTORS,
    HELDOUT,
    OBJECTS,
    STYLES,
    SYNONYMS,
    factor_of,
    forget_words,
    is_heldout,
    substitute,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "COLORS",
    "COLOR_RGB",
    "EVAL_ONLY",
    "FACTORS",
    "HELDOUT",
    "N_TEMPLATES",
    "OBJECTS",
    "STYLES",
    "SYNONYMS",
    "ShapeSpec",
    "caption",
    "factor_of",
    "forget_words",
    "is_heldout",
    "object_mask",
    "prompt_for",
    "render",
    "sample_spec",
    "substitute",
    "vocabulary",
    "word_for",
]
