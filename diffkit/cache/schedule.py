"""Which denoising steps run the full U-Net (DeepCache, Ma et al. 2024, Sec. 3.3 and eq. 7).

Pure functions of the number of denoising steps ``T`` (steps are numbered ``0..T-1`` in sampling
order; how a U-Net evaluation is mapped to a step is described in :mod:`diffkit.cache.hook`). Step 0
is always full: it fills the cache.

* Uniform 1:N: full steps ``0, N, 2N, ...`` (``ceil(T/N)`` of them).
* Non-uniform 1:N (eq. 7): ``ceil(T/N)`` full steps placed quadratically denser around a centre step
  ``c``. With ``n = ceil(T/N)`` and exponent ``p``::

      l_i = linspace(-c^(1/p), (T - c)^(1/p), n + 1)_i,      i = 0..n
      I   = { floor(c + sign(l_i) |l_i|^p) : i = 1..n-1 }  U  {0}

  so that ``l_0`` maps to step 0, ``l_n`` to ``T`` (one past the end) and the interior points crowd
  around ``c`` where ``|l|^p`` is flat. If rounding merges two points (fewer than ``n`` distinct
  steps), ``p`` is relaxed in steps of 0.02, as the authors' ``sample_from_quad_center`` does; at
  ``p = 1`` the points are ``floor(i T / n)``, which are always distinct, so the search ends.

  Two deliberate differences from the authors' experimental code: it evaluates ``(-c) ** (1/p)`` in
  Python, which is a *complex* number, so its points are not the signed power written in the paper
  (for T=50, n=10, c=15, p=1.4 it picks 0,5,9,13,17,21,26,31,37,43 where eq. 7 gives
  0,5,10,13,15,19,24,29,35,42); and it truncates toward zero the offset from ``c`` where we floor
  the step itself, which makes ``p = 1`` reduce exactly to evenly spaced steps.
"""

from __future__ import annotations

import math

#: The paper's SD 1.5 setting c = 15 of T = 50 steps, as a fraction of the trajectory (centre=None).
DEFAULT_CENTER_FRACTION = 0.3
#: The step by which the exponent is relaxed when rounding merges full steps (authors' code).
POWER_DECREMENT = 0.02


def _check_steps(num_steps: int, interval: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}")


def num_full_steps(num_steps: int, interval: int) -> int:
    """ceil(T / N): the number of full steps of both schedules."""
    _check_steps(num_steps, interval)
    return -(-num_steps // interval)


def uniform_full_steps(num_steps: int, interval: int) -> tuple[int, ...]:
    """Uniform 1:N: steps ``0, N, 2N, ... < T``."""
    _check_steps(num_steps, interval)
    return tuple(range(0, num_steps, interval))


def resolve_center(num_steps: int, center: int | None) -> int:
    """The centre step ``c``: ``center`` itself, or round(0.3 T) when ``None``; must lie in [0, T-1]."""
    c = round(DEFAULT_CENTER_FRACTION * num_steps) if center is None else center
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_steps:
        raise ValueError(f"center must be a step index in [0, {num_steps - 1}] for {num_steps} steps, got {center!r}")
    return c


def _quad_center_points(num_steps: int, n: int, c: int, p: float) -> tuple[int, ...]:
    lo, hi = -(c ** (1.0 / p)), (num_steps - c) ** (1.0 / p)
    steps = {0}
    for i in range(1, n):  # interior points only: l_0 -> step 0, l_n -> T (past the end)
        li = lo + (hi - lo) * i / n
        v = c + math.copysign(abs(li) ** p, li)
        steps.add(math.floor(v + 1e-9))  # 1e-9: keep exact integers (p = 1) from rounding down
    return tuple(sorted(steps))


def non_uniform_full_steps(num_steps: int, interval: int, center: int | None = None,
                           power: float = 1.4) -> tuple[int, ...]:
    """Non-uniform 1:N (paper eq. 7): ``ceil(T/N)`` full steps, denser around step ``center``.

    ``power`` is the exponent ``p >= 1``; it is relaxed by 0.02 until the points are distinct (see the
    module docstring). ``non_uniform_power(...)`` tells which exponent was used.
    """
    return _non_uniform(num_steps, interval, center, power)[0]


def non_uniform_power(num_steps: int, interval: int, center: int | None = None, power: float = 1.4) -> float:
    """The exponent the non-uniform schedule ends up using (``power`` or a relaxed value)."""
    return _non_uniform(num_steps, interval, center, power)[1]


def _non_uniform(num_steps, interval, center, power):
    n = num_full_steps(num_steps, interval)
    try:
        power = float(power)
    except (TypeError, ValueError):
        raise ValueError(f"power must be a number >= 1, got {power!r}") from None
    if not math.isfinite(power) or power < 1:
        raise ValueError(f"power must be a finite number >= 1, got {power!r}")
    if n >= num_steps:  # interval 1 (or T = 1): every step is full
        return tuple(range(num_steps)), power
    c = resolve_center(num_steps, center)
    k = 0
    while True:
        p = max(1.0, round(power - k * POWER_DECREMENT, 10))
        steps = _quad_center_points(num_steps, n, c, p)
        if len(steps) == n or p == 1.0:
            return steps, p
        k += 1


def full_steps(config, num_steps: int) -> tuple[int, ...]:
    """The full steps of ``config`` (a :class:`~diffkit.cache.DeepCacheConfig`) for a ``num_steps`` run."""
    if config.schedule == "uniform":
        return uniform_full_steps(num_steps, config.interval)
    return non_uniform_full_steps(num_steps, config.interval, config.center, config.power)
