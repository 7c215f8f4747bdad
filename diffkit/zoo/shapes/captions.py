"""Captions of shapes-world images (training) and prompts with some factors left open (evaluation)."""

from __future__ import annotations

import numpy as np

from .world import EVAL_ONLY, FACTORS, SYNONYMS

WORDS = ("train", "canonical", "eval_only", "synonym")

#: Probability that a training caption names each factor (the rest are left unsaid, so the model also
#: learns prompts that leave factors open).
KEEP_PROB = {"object": 0.95, "color": 0.85, "style": 0.8, "background": 0.6}


def _check_words(words: str) -> None:
    if words not in WORDS:
        raise ValueError(f"words must be one of {WORDS}, got {words!r}")


def word_for(concept: str, words: str, rng: np.random.Generator | None = None) -> str:
    """The word used for ``concept``: canonical, its evaluation-only synonym, or a random synonym.

    ``words="train"`` draws any of its words (evaluation-only included); ``"synonym"`` any but the
    canonical one. Concepts without an evaluation-only word (backgrounds) fall back to canonical.
    """
    _check_words(words)
    syn = SYNONYMS[concept]
    if words == "canonical":
        return syn[0]
    if words == "eval_only":
        return EVAL_ONLY.get(concept, syn[0])
    if rng is None:
        raise ValueError(f"words={words!r} needs an rng")
    pool = syn if words == "train" or len(syn) == 1 else syn[1:]
    return pool[int(rng.integers(len(pool)))]


def _compose(parts: dict[str, str | None], template: int) -> str:
    obj = parts["object"] or "shape"
    color, style, bg = parts["color"], parts["style"], parts["background"]
    adjectives = " ".join(w for w in (color, style) if w)
    on_bg = f" on a {bg} background" if bg else ""
    if template == 0:
        return f"a {adjectives + ' ' if adjectives else ''}{obj}{on_bg}"
    if template == 1:
        items = [obj, color, style, f"{bg} background" if bg else None]
        return ", ".join(w for w in items if w)
    if template == 2:
        return f"a {style + ' ' if style else ''}{obj}{' in ' + color if color else ''}{on_bg}"
    items = [f"a picture of a {color + ' ' if color else ''}{obj}", style, f"on {bg}" if bg else None]
    return ", ".join(w for w in items if w)


N_TEMPLATES = 4


def caption(spec, rng: np.random.Generator, words: str = "train") -> str:
    """A caption of ``spec`` from a random template.

    ``words``: "train" (random synonyms, evaluation-only ones included, and some factors randomly
    left unsaid), "canonical" (canonical words, all factors), "eval_only" (evaluation-only words for
    object, color and style), "synonym" (random non-canonical synonyms, all factors).
    """
    _check_words(words)
    parts: dict[str, str | None] = {}
    for factor in FACTORS:
        concept = getattr(spec, factor)
        keep = words != "train" or rng.random() < KEEP_PROB[factor]
        parts[factor] = word_for(concept, words, rng) if keep else None
    return _compose(parts, int(rng.integers(N_TEMPLATES)))


def prompt_for(
    object: str | None = None,
    color: str | None = None,
    style: str | None = None,
    background: str | None = None,
    words: str = "canonical",
) -> str:
    """Evaluation prompt naming only the given factors, e.g. ``prompt_for(object="star", color="red")``
    -> "a red star". ``words``: "canonical" or "eval_only"."""
    if words not in ("canonical", "eval_only"):
        raise ValueError(f"words must be 'canonical' or 'eval_only' for a prompt, got {words!r}")
    given = {"object": object, "color": color, "style": style, "background": background}
    parts = {}
    for factor, concept in given.items():
        if concept is not None and concept not in FACTORS[factor]:
            raise ValueError(f"{factor} must be one of {FACTORS[factor]} or None, got {concept!r}")
        parts[factor] = word_for(concept, words) if concept is not None else None
    return _compose(parts, 0)
