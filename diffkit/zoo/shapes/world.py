"""The shapes world: its factors, their words, and the held-out combinations.

One object on a plain background, described by four categorical factors (object, color, style,
background). Every object, color and style has several synonyms; one of them is *evaluation-only*:
the diffusion model sees it in training captions, but no erasure job ever puts it in a forget list, so
it measures whether an erasure generalises beyond the words it was given.
"""

from __future__ import annotations

OBJECTS = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "moon")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
STYLES = ("solid", "striped", "dotted", "outlined", "checkered")
BACKGROUNDS = ("black", "white", "gray", "brown")

FACTORS: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "color": COLORS,
    "style": STYLES,
    "background": BACKGROUNDS,
}

#: RGB of each color; far apart in hue or lightness so a 64x64 render keeps them distinguishable.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 28),
    "green": (30, 165, 45),
    "blue": (35, 75, 225),
    "yellow": (250, 225, 30),
    "purple": (130, 40, 175),
    "orange": (250, 135, 15),
    "pink": (250, 140, 205),
    "cyan": (30, 215, 225),
}

#: Background RGB; neutral, so that no background can be mistaken for an object color.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (95, 62, 38),
}

#: Canonical word -> all its words, canonical first. Phrases are allowed; every word is alphabetic.
SYNONYMS: dict[str, tuple[str, ...]] = {
    # objects
    "circle": ("circle", "disk", "round disc", "orb"),
    "square": ("square", "box", "quadrate", "block"),
    "triangle": ("triangle", "trigon", "three sided shape", "wedge"),
    "star": ("star", "five pointed star", "starlet", "pentagram"),
    "heart": ("heart", "love heart", "love symbol", "valentine"),
    "cross": ("cross", "cruciform", "crux", "plus"),
    "hexagon": ("hexagon", "hex", "six sided shape", "honeycomb"),
    "moon": ("moon", "half moon", "lunar crescent", "sickle"),
    # colors
    "red": ("red", "crimson", "ruby", "scarlet"),
    "green": ("green", "emerald", "verdant", "jade"),
    "blue": ("blue", "azure", "sapphire", "cobalt"),
    "yellow": ("yellow", "golden", "canary", "lemon"),
    "purple": ("purple", "violet", "amethyst", "plum"),
    "orange": ("orange", "amber", "apricot", "tangerine"),
    "pink": ("pink", "rose", "blush", "flamingo"),
    "cyan": ("cyan", "turquoise", "teal", "aqua"),
    # styles
    "solid": ("solid", "filled", "plain", "flat"),
    "striped": ("striped", "stripy", "lined", "banded"),
    "dotted": ("dotted", "polka dot", "speckled", "spotted"),
    "outlined": ("outlined", "contour", "line drawing", "hollow"),
    "checkered": ("checkered", "checked", "chequered", "chessboard"),
    # backgrounds (no evaluation-only word: backgrounds are never erased)
    "black": ("black", "dark"),
    "white": ("white", "bright"),
    "gray": ("gray", "grey"),
    "brown": ("brown", "wooden"),
}

#: Canonical word -> its evaluation-only synonym (the last listed word of each object, color, style).
EVAL_ONLY: dict[str, str] = {c: SYNONYMS[c][-1] for c in (*OBJECTS, *COLORS, *STYLES)}

#: Words of the caption templates besides the factor words.
TEMPLATE_WORDS = ("a", "an", "on", "in", "of", "with", "background", "shape", "picture", "drawing", "an", "image")


def factor_of(concept: str) -> str:
    """Return the factor ("object", "color", "style", "background") a canonical word belongs to."""
    for factor, values in FACTORS.items():
        if concept in values:
            return factor
    allowed = ", ".join(v for values in FACTORS.values() for v in values)
    raise ValueError(f"concept must be a canonical word of the shapes world ({allowed}), got {concept!r}")


def forget_words(concept: str) -> tuple[str, ...]:
    """All words of ``concept`` an erasure job may name: its synonyms minus the evaluation-only one."""
    factor_of(concept)
    held = EVAL_ONLY.get(concept)
    return tuple(w for w in SYNONYMS[concept] if w != held)


def substitute(word: str) -> str:
    """SalUn's substitute concept for ``word`` (a canonical word or any of its synonyms) in this world:
    the next canonical concept of the same factor (red -> green, cyan -> red, star -> heart, striped ->
    dotted), the reference code's "next class" rule (``random_label.py``: class k -> class k + 1 mod 10)."""
    canonical = next((c for c, words in SYNONYMS.items() if word in words), word)
    values = FACTORS[factor_of(canonical)]
    return values[(values.index(canonical) + 1) % len(values)]


def vocabulary() -> tuple[str, ...]:
    """Every single word a caption can contain (for ``build_clip_tokenizer``), sorted."""
    words = {w for phrase in (*TEMPLATE_WORDS, *(p for ws in SYNONYMS.values() for p in ws)) for w in phrase.split()}
    return tuple(sorted(words))


def _heldout_triples() -> frozenset[tuple[str, str, str]]:
    # A fixed, balanced tenth of the (object, color, style) triples: every object, color and style
    # occurs in some held-out triple, and every pair of them still occurs in training.
    out = set()
    for oi, o in enumerate(OBJECTS):
        for ci, c in enumerate(COLORS):
            for si, s in enumerate(STYLES):
                if (oi + 2 * ci + 3 * si) % 10 == 0:
                    out.add((o, c, s))
    return frozenset(out)


#: (object, color, style) triples never shown to the diffusion model; quality is measured on them.
HELDOUT: frozenset[tuple[str, str, str]] = _heldout_triples()


def is_heldout(spec) -> bool:
    """True if ``spec``'s (object, color, style) is a held-out combination."""
    return (spec.object, spec.color, spec.style) in HELDOUT
