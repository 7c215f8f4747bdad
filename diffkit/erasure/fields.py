"""Checks of the attack and probe configs' fields, one message per kind of field (shared so they stay alike)."""

from __future__ import annotations

import math


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_integers(config, names, lo: int = 1) -> None:
    """Each named field an integer >= ``lo``: "NAME must be an integer >= LO, got V"."""
    for name in names:
        v = getattr(config, name)
        if not _integer(v) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def check_number(config, name: str, positive: bool = False) -> None:
    """A finite number >= 0 (``positive``: > 0): "NAME must be >= 0, got V" / "NAME must be > 0, got V"."""
    v = getattr(config, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if positive
                                                                                             else v >= 0)
    if not ok:
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {v!r}")


def check_choice(config, name: str, choices) -> None:
    v = getattr(config, name)
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")


def check_seed(config) -> None:
    if not _integer(config.seed):
        raise ValueError(f"seed must be an integer, got {config.seed!r}")
