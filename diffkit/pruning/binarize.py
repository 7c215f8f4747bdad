"""From learned logits to kept unit indices: global top-k per unit kind, or a target parameter cut.

EcoDiff binarises by a global top-k over all units of a kind (heads, FFN neurons). We do the same per
kind with separate keep ratios (``KeepRatios``), or pick the number of kept units across all kinds so
that the U-Net loses at least a target fraction of its parameters (``target_reduction``). Either way
each module's kept count is then rounded to a width that is a multiple of ``multiple`` (default 8:
unaligned widths ran 1.4-2.0x slower per block on an H100); a module may end up with zero units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .units import KINDS, Unit, unit_param_costs


@dataclass(frozen=True)
class KeepRatios:
    """Fraction of units kept, per kind (1.0 = that kind is not pruned)."""

    heads: float = 1.0
    ffn: float = 1.0
    channels: float = 1.0

    def __post_init__(self):
        for kind in KINDS:
            v = getattr(self, kind)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"keep ratio {kind} must be in [0, 1], got {v}")

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


def round_count(k: int, unit: Unit, multiple: int) -> int:
    """Round ``k`` kept units to the nearest count whose width ``k * unit.width`` is a multiple of ``multiple``.

    The full size is always allowed (the module is then untouched); ties round up.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    step = multiple // math.gcd(unit.width, multiple)
    r = int(math.floor(k / step + 0.5)) * step
    return min(r, unit.size)


def _ranked(scores: dict[str, torch.Tensor], units: list[Unit]) -> list[tuple[float, int, int, int]]:
    """(score, unit position, index, order) for every unit, best first; ties by module order then index."""
    rows = []
    for pos, u in enumerate(units):
        s = scores[u.name].detach().float().cpu().reshape(-1)
        if s.numel() != u.size:
            raise ValueError(f"scores for {u.name} have {s.numel()} entries, the module has {u.size} units")
        rows += [(float(v), pos, i) for i, v in enumerate(s.tolist())]
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    return rows


def _kept_from_top(rows, top: int, units: list[Unit], scores, multiple: int) -> dict[str, list[int]]:
    counts = [0] * len(units)
    for _, pos, _ in rows[:top]:
        counts[pos] += 1
    kept = {}
    for pos, u in enumerate(units):
        k = round_count(counts[pos], u, multiple)
        order = torch.argsort(-scores[u.name].detach().float().cpu().reshape(-1), stable=True)
        kept[u.name] = sorted(order[:k].tolist())
    return kept


def binarize(
    scores: dict[str, torch.Tensor],
    units: list[Unit],
    keep: KeepRatios | None = None,
    *,
    target_reduction: float | None = None,
    unet: torch.nn.Module | None = None,
    multiple: int = 8,
) -> dict[str, list[int]]:
    """Kept unit indices per module name (higher score = more important).

    ``keep``: global top-k within each kind, ``round(ratio * units of that kind)`` kept before rounding.
    ``target_reduction`` (needs ``unet`` for parameter counts): one global ranking over all given units,
    keeping the most units whose U-Net still loses at least that fraction of its parameters.
    """
    if (keep is None) == (target_reduction is None):
        raise ValueError("give exactly one of keep (KeepRatios) or target_reduction")
    missing = [u.name for u in units if u.name not in scores]
    if missing:
        raise ValueError(f"no scores for {len(missing)} unit module(s), e.g. {missing[0]}")
    if keep is not None:
        kept: dict[str, list[int]] = {}
        for kind in KINDS:
            group = [u for u in units if u.kind == kind]
            if not group:
                continue
            rows = _ranked(scores, group)
            top = int(math.floor(getattr(keep, kind) * len(rows) + 0.5))
            kept.update(_kept_from_top(rows, top, group, scores, multiple))
        return kept
    if not 0.0 <= target_reduction < 1.0:
        raise ValueError(f"target_reduction must be in [0, 1), got {target_reduction}")
    if unet is None:
        raise ValueError("target_reduction needs the unet (to count parameters)")
    rows = _ranked(scores, units)
    total = sum(p.numel() for p in unet.parameters())
    costs = {u.name: unit_param_costs(unet, u) for u in units}

    def reduction(top: int) -> tuple[float, dict]:
        kept = _kept_from_top(rows, top, units, scores, multiple)
        return parameter_reduction(kept, units, costs) / total, kept

    lo, hi = 0, len(rows)  # invariant: reduction(lo) >= target; find the largest such top
    if reduction(hi)[0] >= target_reduction:
        return reduction(hi)[1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reduction(mid)[0] >= target_reduction:
            lo = mid
        else:
            hi = mid
    frac, kept = reduction(lo)
    if frac < target_reduction:
        raise ValueError(
            f"target_reduction={target_reduction} is unreachable with these unit kinds (at most {frac:.3f})"
        )
    return kept


def parameter_reduction(kept: dict[str, list[int]], units: list[Unit], costs: dict) -> int:
    """Parameters removed by pruning to ``kept`` (from ``unit_param_costs``; no surgery needed)."""
    removed = 0
    for u in units:
        if u.name not in kept:
            continue
        fixed, per, empty = costs[u.name]
        k = len(kept[u.name])
        full = fixed + per * u.size
        removed += full - (fixed + per * k if k else empty)
    return removed


def kept_fractions(kept: dict[str, list[int]], units: list[Unit]) -> dict[str, float]:
    """Fraction of units kept per kind."""
    out = {}
    for kind in KINDS:
        group = [u for u in units if u.kind == kind]
        if group:
            out[kind] = sum(len(kept.get(u.name, range(u.size))) for u in group) / sum(u.size for u in group)
    return out
