"""Intervals on constructed data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffkit.evaluation import bootstrap_interval, paired_difference, rate, verdict, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    (5, 10, 0.2366, 0.7634),     # Brown, Cai & DasGupta (2001) / any Wilson table
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),   # Newcombe (1998), Table I, example 81/263
])
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_half_width_at_256_is_about_six_points():
    """The evidence issue's sample size: a rate near 50% at n = 256 has a half-width of ~6 points."""
    r = rate([True] * 128 + [False] * 128)
    assert r.value == 0.5 and r.half_width == pytest.approx(1.96 * math.sqrt(0.25 / 256), abs=2e-3)
    assert str(r) == "50.0% [43.9, 56.1] (n=256)"
    assert r.to_json() == {"k": 128, "n": 256, "rate": 0.5, "ci95": [r.low, r.high]}


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"need 0 <= k <= n and n > 0, got k=3, n=2"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="rate of an empty sequence"):
        rate([])
    with pytest.raises(ValueError, match="values must be finite"):
        bootstrap_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"groups must label every value: 1 labels for 2 values"):
        bootstrap_interval([1.0, 2.0], groups=["a"])
    with pytest.raises(ValueError, match=r"paired values must be 1-D of the same length"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence must be in"):
        wilson_interval(1, 2, confidence=1.5)


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    x = np.random.default_rng(0).normal(10.0, 2.0, 400)
    lo, hi = bootstrap_interval(x, n_resamples=4000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.05) and hi == pytest.approx(x.mean() + 1.96 * se, abs=0.05)
    assert bootstrap_interval([3.0] * 20) == (3.0, 3.0)
    assert bootstrap_interval(x, seed=1) == bootstrap_interval(x, seed=1)


def test_group_bootstrap_is_wider_when_items_within_a_group_agree():
    """Eight images per prompt that all agree carry the information of one: resampling prompts says so."""
    per_prompt = np.random.default_rng(1).random(32) < 0.5
    values = np.repeat(per_prompt.astype(float), 8)
    groups = np.repeat(np.arange(32), 8)
    item_lo, item_hi = bootstrap_interval(values)
    lo, hi = bootstrap_interval(values, groups=groups)
    assert (hi - lo) > 2 * (item_hi - item_lo)


def test_paired_difference_removes_the_shared_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 5, 300)  # varies a lot between prompts, shared by both settings
    a = difficulty + 1.0 + rng.normal(0, 0.1, 300)
    b = difficulty + rng.normal(0, 0.1, 300)
    d = paired_difference(a, b)
    assert d.n == 300 and d.estimate == pytest.approx(1.0, abs=0.03)
    assert 0.95 < d.low < d.estimate < d.high < 1.05  # a paired interval of ~0.01 despite sd 5 per prompt
    assert paired_difference(a, a).to_json() == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 300}


@pytest.mark.parametrize("low, high, target, direction, expected", [
    (0.91, 0.97, 0.90, ">=", "met"), (0.80, 0.88, 0.90, ">=", "missed"),
    (0.86, 0.94, 0.90, ">=", "not resolved at this n"),
    (0.99, 1.004, 1.01, "<=", "met"), (1.02, 1.05, 1.01, "<=", "missed"),
    (0.97, 1.03, 1.01, "<=", "not resolved at this n"),
])
def test_verdict(low, high, target, direction, expected):
    assert verdict(low, high, target, direction) == expected
