"""DeepCache config validation and the full-step schedules (uniform 1:N, non-uniform eq. 7)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from diffkit.cache import (
    DeepCacheConfig,
    full_steps,
    non_uniform_full_steps,
    non_uniform_power,
    num_full_steps,
    uniform_full_steps,
)
from diffkit.cache.cost import speed_ceiling
from diffkit.cache.schedule import resolve_center


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_and_frozen():
    c = DeepCacheConfig()
    assert (c.interval, c.branch, c.schedule, c.center, c.power) == (3, 0, "uniform", None, 1.4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.interval = 5
    assert DeepCacheConfig(interval=np.int64(4)).interval == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(interval=0), "interval must be an integer >= 1, got 0"),
        (dict(interval=-2), "interval must be an integer >= 1, got -2"),
        (dict(interval=2.5), "interval must be an integer >= 1, got 2.5"),
        (dict(interval=True), "interval must be an integer >= 1, got True"),
        (dict(branch=-1), "branch must be an integer >= 0, got -1"),
        (dict(branch="0"), "branch must be an integer >= 0, got '0'"),
        (dict(schedule="linear"), "schedule must be one of ('uniform', 'non-uniform'), got 'linear'"),
        (dict(schedule="non_uniform"), "schedule must be one of ('uniform', 'non-uniform'), got 'non_uniform'"),
        (dict(center=-1), "center must be an integer >= 0, got -1"),
        (dict(power=0.9), "power must be a finite number >= 1, got 0.9"),
        (dict(power=float("nan")), "power must be a finite number >= 1, got nan"),
        (dict(power="high"), "power must be a number >= 1, got 'high'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError) as e:
        DeepCacheConfig(**kwargs)
    assert str(e.value) == message


# ---------------------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("T", [1, 10, 25, 50])
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_uniform_schedule(T, N):
    steps = uniform_full_steps(T, N)
    assert steps == tuple(s for s in range(T) if s % N == 0)
    assert len(steps) == num_full_steps(T, N) == math.ceil(T / N)
    assert full_steps(DeepCacheConfig(interval=N), T) == steps


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        uniform_full_steps(0, 3)
    with pytest.raises(ValueError, match="interval must be an integer >= 1, got 0"):
        non_uniform_full_steps(10, 0)
    with pytest.raises(ValueError, match=r"center must be a step index in \[0, 9\] for 10 steps, got 10"):
        non_uniform_full_steps(10, 3, center=10)
    with pytest.raises(ValueError, match="power must be a finite number >= 1, got 0.5"):
        non_uniform_full_steps(10, 3, power=0.5)


# ---------------------------------------------------------------------------------------------- non-uniform
def eq7(T, N, c, p):
    """Paper eq. 7 written out: n+1 points evenly spaced in l = sign(x)|x|^(1/p) from -c to T-c, mapped back
    through c + sign(l)|l|^p and floored; the first point is step 0, the last (step T) is dropped."""
    n = math.ceil(T / N)
    ls = np.linspace(-(c ** (1 / p)), (T - c) ** (1 / p), n + 1)
    pts = {0} | {math.floor(c + np.sign(x) * abs(x) ** p + 1e-9) for x in ls[1:-1]}
    return tuple(sorted(pts))


def test_non_uniform_paper_setting():
    # SD 1.5, 50 steps, N = 5, c = 15, p = 1.4 (the paper's setting): 10 full steps crowded around 15
    steps = non_uniform_full_steps(50, 5, center=15, power=1.4)
    assert steps == (0, 5, 10, 13, 15, 19, 24, 29, 35, 42) == eq7(50, 5, 15, 1.4)
    gaps = np.diff(steps)
    assert gaps.min() == 2 and steps[int(np.argmin(gaps)) + 1] == 15  # densest at the centre
    assert gaps[-1] == 7  # sparsest far from it


@pytest.mark.parametrize("T", [10, 25, 50])
@pytest.mark.parametrize("N", [2, 3, 5])
def test_non_uniform_matches_eq7(T, N):
    c = round(0.3 * T)
    steps = non_uniform_full_steps(T, N)  # centre None -> round(0.3 T)
    p = non_uniform_power(T, N)
    assert steps == eq7(T, N, c, p)
    assert len(steps) == math.ceil(T / N) and steps[0] == 0 and steps[-1] < T
    assert list(steps) == sorted(set(steps))
    assert full_steps(DeepCacheConfig(interval=N, schedule="non-uniform"), T) == steps
    assert resolve_center(T, None) == c


def test_non_uniform_relaxes_power_when_points_merge():
    # T = 50, N = 2: at p = 1.4 and 1.38 rounding merges full steps near the centre; 1.36 is the first
    # exponent (1.4 - k * 0.02) giving ceil(50/2) = 25 distinct steps, as in the authors' search.
    assert len(eq7(50, 2, 15, 1.4)) < 25 and len(eq7(50, 2, 15, 1.38)) < 25
    assert non_uniform_power(50, 2, center=15, power=1.4) == pytest.approx(1.36)
    assert non_uniform_full_steps(50, 2, center=15, power=1.4) == eq7(50, 2, 15, 1.36)


def test_non_uniform_power_one_is_even_spacing_and_interval_one_is_all():
    assert non_uniform_full_steps(50, 5, center=15, power=1.0) == tuple(range(0, 50, 5))
    assert non_uniform_full_steps(12, 1) == tuple(range(12))


def test_speed_ceiling_formula():
    # N / (1 + (N - 1) r): PAPERS.md's SD 1.5 branch-0 ratio 7.9% gives ~2.6x at N=3 and ~3.8x at N=5
    assert speed_ceiling(3, 0.079) == pytest.approx(3 / (1 + 2 * 0.079))
    assert round(speed_ceiling(3, 0.079), 1) == 2.6 and round(speed_ceiling(5, 0.079), 1) == 3.8
    # a finite run: 50 steps at N = 3 are 17 full + 33 cached steps
    assert speed_ceiling(3, 0.079, num_steps=50) == pytest.approx(50 / (17 + 33 * 0.079))


def test_count_steps_from_counts_noise_levels():
    from diffkit.cache.hook import count_steps_from

    heun_like = [999.0, 899.0, 899.0, 799.0, 799.0, 699.0, 699.0]
    assert count_steps_from(heun_like, 999.0) == 4
    assert count_steps_from(heun_like, 899.0) == 3  # img2img starting at the 2nd level
    assert count_steps_from(heun_like, 123.0) == 4  # unknown start: the whole schedule
