"""The shapes world: renderer determinism and distinctness, synonyms, captions, held-out split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffkit.zoo import build_clip_tokenizer
from diffkit.zoo.shapes import (
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
    ShapeSpec,
    caption,
    factor_of,
    forget_words,
    is_heldout,
    object_mask,
    prompt_for,
    render,
    sample_spec,
    vocabulary,
    word_for,
)
from diffkit.zoo.shapes.render import CHECKER_PERIOD, DOT_PERIOD, STRIPE_PERIOD
from diffkit.zoo.train_vae import training_specs

BASE = ShapeSpec("star", "red", "solid", "black", x=0.5, y=0.5, size=0.28, rotation=10.0)


def _with(**kw) -> ShapeSpec:
    d = {f: getattr(BASE, f) for f in ("object", "color", "style", "background", "x", "y", "size", "rotation")}
    d.update(kw)
    return ShapeSpec(**d)


def test_factor_counts():
    assert len(OBJECTS) >= 8 and len(COLORS) >= 8 and len(STYLES) >= 5 and len(BACKGROUNDS) >= 4
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLORS)
    assert {"solid", "striped", "dotted", "outlined", "checkered"} <= set(STYLES)
    assert FACTORS == {"object": OBJECTS, "color": COLORS, "style": STYLES, "background": BACKGROUNDS}
    # no word names two concepts
    all_values = [v for vs in FACTORS.values() for v in vs]
    assert len(all_values) == len(set(all_values))


def test_render_is_deterministic_uint8():
    spec = sample_spec(np.random.default_rng(3))
    a, b = render(spec), render(spec)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert render(spec, size=32).shape == (32, 32, 3)
    assert sample_spec(np.random.default_rng(3)) == spec


@pytest.mark.parametrize("factor", list(FACTORS))
def test_every_factor_value_renders_distinctly(factor):
    images = [render(_with(**{factor: v})).astype(np.int16) for v in FACTORS[factor]]
    for (i, a), (j, b) in itertools.combinations(enumerate(images), 2):
        # mean absolute difference over the image, in grey levels
        assert np.abs(a - b).mean() > 2.0, (FACTORS[factor][i], FACTORS[factor][j])


def test_solid_object_shows_its_color_and_background():
    for color in COLORS:
        img = render(_with(color=color, style="solid", size=0.3))
        assert tuple(img[32, 32]) == COLOR_RGB[color]
        assert tuple(img[1, 1]) == BACKGROUND_RGB["black"]


def test_object_mask_area_and_outline_is_thin():
    full = object_mask(_with(object="square", rotation=0.0), 256).mean()
    # square of half-diagonal 0.9 * r: side = 0.9 * r * sqrt(2) = 0.356 of the image
    assert full == pytest.approx((0.9 * 0.28 * 2**0.5) ** 2, rel=0.03)
    solid = (render(_with(object="circle")) != BACKGROUND_RGB["black"]).any(-1).mean()
    outlined = (render(_with(object="circle", style="outlined")) != BACKGROUND_RGB["black"]).any(-1).mean()
    # a ring 3 px wide around a disc of radius 18 px covers well under half of it
    assert outlined < 0.5 * solid


def _color_runs(row: np.ndarray, rgb) -> tuple[list[int], list[int]]:
    """Starts and lengths of the runs of pixels of exactly ``rgb`` along a row (runs cut by its ends left out)."""
    on = np.concatenate([[0], np.all(row == rgb, axis=-1).astype(int), [0]])
    starts, ends = np.flatnonzero(np.diff(on) == 1), np.flatnonzero(np.diff(on) == -1)
    whole = (starts > 0) & (ends < len(row))
    return starts[whole].tolist(), (ends - starts)[whole].tolist()


@pytest.mark.parametrize(
    "style, latent_period, width", [("striped", 3.0, 24), ("dotted", 3.5, 32), ("checkered", 5.5, 44)]
)
def test_pattern_periods_in_latent_pixels(style, latent_period, width):
    # rendered at 256 px (4x the model's 64) so that whole periods fit in one object, and read along the row
    # through its centre; a pixel of the reference VAE's 16x16 latent is a sixteenth of the side
    img = render(_with(object="square", style=style, size=0.5, rotation=0.0, x=0.5, y=0.5), size=256)
    starts, lengths = _color_runs(img[128, 47:209], COLOR_RGB["red"])  # the square spans columns 47..208
    assert set(lengths) == {width}  # half a period of stripes and checks; a dot's diameter (0.6 of its period)
    assert set(np.diff(starts).tolist()) <= {latent_period * 16}  # 48, 56 and 88 px at 256 px
    assert {"striped": STRIPE_PERIOD, "dotted": DOT_PERIOD, "checkered": CHECKER_PERIOD}[style] * 16 == latent_period


def test_sample_spec_pins_fixed_factors_and_stays_in_frame():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = sample_spec(rng, object="moon", background="white")
        assert s.object == "moon" and s.background == "white"
        assert s.size <= s.x <= 1 - s.size and s.size <= s.y <= 1 - s.size
    with pytest.raises(ValueError, match="unknown spec fields"):
        sample_spec(rng, shape="moon")


def test_sample_spec_pose_ranges():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng, rotation_range=(-15.0, 15.0), center_range=0.1) for _ in range(200)]
    assert all(-15.0 <= s.rotation <= 15.0 for s in specs)
    assert all(abs(s.x - 0.5) <= 0.1 and abs(s.y - 0.5) <= 0.1 for s in specs)
    # a range wider than the frame allows stays in frame
    wide = [sample_spec(rng, center_range=0.5) for _ in range(200)]
    assert all(s.size <= s.x <= 1 - s.size for s in wide)
    # the ranges do not change how many numbers are drawn: same seed, same factors
    a = [sample_spec(np.random.default_rng(5)) for _ in range(3)]
    b = [sample_spec(np.random.default_rng(5), rotation_range=(0.0, 1.0), center_range=0.0) for _ in range(3)]
    assert [(s.object, s.color, s.style, s.background, s.size) for s in a] == [
        (s.object, s.color, s.style, s.background, s.size) for s in b
    ]
    assert all(s.x == 0.5 and s.y == 0.5 and 0.0 <= s.rotation <= 1.0 for s in b)
    with pytest.raises(ValueError, match=r"rotation_range must be \(low, high\) with low <= high, got \(10.0, -10.0\)"):
        sample_spec(rng, rotation_range=(10.0, -10.0))
    with pytest.raises(ValueError, match=r"center_range must be in \[0, 0.5\], got 0.7"):
        sample_spec(rng, center_range=0.7)


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="object must be one of .* got 'blob'"):
        _with(object="blob")
    with pytest.raises(ValueError, match="size must be in \\[0.05, 0.5\\], got 0.9"):
        _with(size=0.9)
    with pytest.raises(ValueError, match="x must be in \\[0, 1\\], got 1.5"):
        _with(x=1.5)
    with pytest.raises(ValueError, match="size must be >= 16, got 8"):
        render(BASE, size=8)


def test_synonyms_and_eval_only_words():
    for concept in (*OBJECTS, *COLORS, *STYLES):
        words = SYNONYMS[concept]
        assert words[0] == concept and len(words) >= 3 and len(set(words)) == len(words)
        assert EVAL_ONLY[concept] in words and EVAL_ONLY[concept] != concept
        assert EVAL_ONLY[concept] not in forget_words(concept)
        assert set(forget_words(concept)) == set(words) - {EVAL_ONLY[concept]}
        # the evaluation-only word shares no word with any forget phrase of any concept
        forget_tokens = {w for c in EVAL_ONLY for p in forget_words(c) for w in p.split()}
        assert EVAL_ONLY[concept] not in forget_tokens
    for bg in BACKGROUNDS:
        assert SYNONYMS[bg][0] == bg and forget_words(bg) == SYNONYMS[bg]
    with pytest.raises(ValueError, match="concept must be a canonical word .* got 'crimson'"):
        forget_words("crimson")
    assert factor_of("moon") == "object" and factor_of("gray") == "background"


def test_vocabulary_tokenizes_to_single_tokens():
    vocab = vocabulary()
    assert all(w.isalpha() for w in vocab)
    tok = build_clip_tokenizer(vocab)
    assert all(len(tok.tokenize(w)) == 1 for w in vocab)


def test_caption_word_sets():
    rng = np.random.default_rng(0)
    vocab = set(vocabulary())
    seen = set()
    for _ in range(3000):
        spec = sample_spec(rng)
        text = caption(spec, rng, words="train")
        assert set(text.replace(",", "").split()) <= vocab
        seen.update(p for c in SYNONYMS for p in SYNONYMS[c] if f" {p} " in f" {text.replace(',', ' ')} ")
    # every word of every concept, evaluation-only ones included, occurs in training captions
    assert seen == {p for ws in SYNONYMS.values() for p in ws}
    spec = _with(object="cross", color="cyan", style="dotted", background="gray")
    canon = caption(spec, rng, words="canonical")
    assert {"cross", "cyan", "dotted", "gray"} <= set(canon.replace(",", "").split())
    ev = caption(spec, rng, words="eval_only").replace(",", "").split()
    assert {"plus", "aqua", "spotted", "gray"} <= set(ev) and "cross" not in ev and "cyan" not in ev
    syn = caption(spec, rng, words="synonym").replace(",", " ")
    assert " cross " not in f" {syn} " and " cyan " not in f" {syn} "
    with pytest.raises(ValueError, match="words must be one of"):
        caption(spec, rng, words="all")
    with pytest.raises(ValueError, match="needs an rng"):
        word_for("red", "train")


def test_prompt_for():
    assert prompt_for(object="star", color="red") == "a red star"
    assert prompt_for(color="red") == "a red shape"
    assert prompt_for("circle", "blue", "striped", "white") == "a blue striped circle on a white background"
    assert prompt_for(object="star", style="dotted", background="black", words="eval_only") == (
        "a spotted pentagram on a black background"
    )
    with pytest.raises(ValueError, match="color must be one of .* got 'crimson'"):
        prompt_for(color="crimson")
    with pytest.raises(ValueError, match="words must be 'canonical' or 'eval_only'"):
        prompt_for(color="red", words="train")


def test_heldout_split():
    assert len(HELDOUT) == 32
    for i, factor in enumerate(("object", "color", "style")):
        assert {t[i] for t in HELDOUT} == set(FACTORS[factor])
    # every pair of held-out values still occurs together in some training triple
    train = set(itertools.product(OBJECTS, COLORS, STYLES)) - HELDOUT
    for o, c, s in HELDOUT:
        assert any(t[:2] == (o, c) for t in train) and any(t[1:] == (c, s) for t in train)
    o, c, s = sorted(HELDOUT)[0]
    assert is_heldout(_with(object=o, color=c, style=s))
    assert not any(is_heldout(sp) for sp in training_specs(np.random.default_rng(0), 500))
