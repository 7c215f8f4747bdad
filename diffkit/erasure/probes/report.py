"""What a probe returns: per-item hits (did the concept come back?), per-level hits, and the images."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProbeReport:
    """``hits[i]``: item i brought the concept back; ``levels``: per setting (e.g. completion strength) the
    hits of every item at that setting (an item's hit is True when any of its levels recovered it);
    ``details``: per item what was chosen (seed, candidate index, score...); ``settings``: the config."""

    probe: str
    hits: list[bool]
    levels: dict[str, list[bool]] = field(default_factory=dict)
    details: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    images: torch.Tensor | None = None  # (N, 3, H, W) in [0, 1], the image judged for each item

    @property
    def n(self) -> int:
        return len(self.hits)

    @property
    def k(self) -> int:
        return sum(bool(h) for h in self.hits)

    @property
    def recovery_rate(self) -> float:
        return self.k / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {"probe": self.probe, "k": self.k, "n": self.n, "rate": self.recovery_rate, "hits": self.hits,
                "levels": self.levels, "details": self.details, "settings": self.settings}
