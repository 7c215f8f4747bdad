"""Statistics for every reported figure: rates with 95% intervals, paired differences, verdicts.

* :func:`wilson_interval` — the Wilson score interval of a binomial rate (Wilson 1927; Brown, Cai &
  DasGupta 2001 recommend it over the normal "Wald" interval, which collapses at 0% and 100%):

      centre = (p + z^2 / 2n) / (1 + z^2 / n),   half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

* :func:`bootstrap_interval` — a percentile bootstrap of any statistic, resampling items or whole
  groups (e.g. all images of one prompt, so prompts, not images, are the unit of replication);
* :func:`paired_difference` — two settings measured on the same prompts and seeds: the bootstrap
  interval of the mean difference, resampling the pairs together (the pairing removes the prompt's own
  difficulty from the comparison);
* :func:`verdict` — "met" only when the interval clears the target, "missed" when it lies wholly on the
  wrong side, else "not resolved at this n".

Every function is pure and deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

VERDICTS = ("met", "missed", "not resolved at this n")


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k!r}, n={n!r}")
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A rate with its n and 95% Wilson interval (fractions in [0, 1])."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_json(self) -> dict:
        return {"k": self.k, "n": self.n, "rate": self.value, "ci95": [self.low, self.high]}

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"


def rate(hits: Sequence[bool]) -> Rate:
    """:class:`Rate` of a sequence of hits (True = success)."""
    hits = [bool(h) for h in hits]
    if not hits:
        raise ValueError("rate of an empty sequence")
    k, n = sum(hits), len(hits)
    return Rate(k, n, *wilson_interval(k, n))


def _groups(n: int, groups: Sequence | None) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"groups must label every value: {len(groups)} labels for {n} values")
    index: dict = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return [np.array(ix) for ix in index.values()]


def bootstrap_interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, *,
                       groups: Sequence | None = None, n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``; with ``groups``, whole groups are resampled."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    _z(confidence)
    parts = _groups(len(x), groups)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for r in range(n_resamples):
        pick = rng.integers(0, len(parts), len(parts))
        stats[r] = statistic(x[np.concatenate([parts[i] for i in pick])])
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` over paired items, with its paired bootstrap interval."""

    estimate: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict:
        return {"difference": self.estimate, "ci95": [self.low, self.high], "n": self.n}


def paired_difference(a: Sequence[float], b: Sequence[float], *, groups: Sequence | None = None,
                      n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Difference:
    """Setting A minus setting B, measured on the same items (prompts x seeds), resampled as pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be 1-D of the same length, got {a.shape} and {b.shape}")
    d = a - b
    lo, hi = bootstrap_interval(d, np.mean, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return Difference(float(d.mean()), lo, hi, len(d))


def verdict(low: float, high: float, target: float, direction: str = ">=") -> str:
    """Judge an interval against a target: ``direction`` ">=" (the quantity must reach ``target``) or "<="."""
    if direction not in (">=", "<="):
        raise ValueError(f"direction must be '>=' or '<=', got {direction!r}")
    if low > high:
        raise ValueError(f"interval [{low}, {high}] is empty")
    if direction == ">=":
        return "met" if low >= target else "missed" if high < target else "not resolved at this n"
    return "met" if high <= target else "missed" if low > target else "not resolved at this n"
