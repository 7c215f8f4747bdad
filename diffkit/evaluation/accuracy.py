"""Concept accuracy and the UnlearnCanvas erasure metrics (UA, IRA, CRA) from oracle labels.

Labels are canonical names (``"red"``, ``"star"``). An expected label of ``None`` means the prompt did
not name that factor, so the image is not scored on it.

UnlearnCanvas (Zhang et al., 2024) defines, for an erased concept ``c`` of factor ``f``:

* **UA** (unlearning accuracy) = share of images generated from prompts naming ``c`` in which the oracle
  does *not* see ``c``:  UA = mean_i 1[pred_f(x_i) != c]  over forget-prompt images (higher is better);
* **IRA** (in-domain retain accuracy) = accuracy on factor ``f`` over images of prompts naming another
  concept ``c' != c`` of the same factor:  IRA = mean_i 1[pred_f(x_i) = c'_i];
* **CRA** (cross-domain retain accuracy) = accuracy on the *other* factors ``g != f``, pooled over every
  (image, factor) pair the prompt names:  CRA = mean_{i, g != f, y_ig given} 1[pred_g(x_i) = y_ig].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _check_lengths(pred: Sequence, expected: Sequence, what: str) -> None:
    if len(pred) != len(expected):
        raise ValueError(f"{what}: {len(pred)} predictions but {len(expected)} expected labels")


def _factor_hits(pred: Mapping[str, Sequence[str]], expected: Mapping[str, Sequence[str | None]],
                 factors) -> dict[str, tuple[int, int]]:
    """factor -> (correct, scored) over the images whose expected label for that factor is given."""
    out = {}
    for factor in factors:
        if factor not in pred:
            raise ValueError(f"no predictions for factor {factor!r}; predictions have {sorted(pred)}")
        p, e = pred[factor], expected[factor]
        _check_lengths(p, e, f"factor {factor!r}")
        scored = [(a, b) for a, b in zip(p, e) if b is not None]
        out[factor] = (sum(a == b for a, b in scored), len(scored))
    return out


def concept_accuracy(pred: Mapping[str, Sequence[str]], expected: Mapping[str, Sequence[str | None]]
                     ) -> dict[str, float]:
    """Per-factor accuracy: factor -> share of scored images whose predicted label equals the expected one.

    ``pred`` and ``expected`` map each factor to one label per image; ``None`` expected labels are not
    scored; a factor with no scored image is left out of the result.
    """
    hits = _factor_hits(pred, expected, expected.keys())
    return {f: c / n for f, (c, n) in hits.items() if n > 0}


def unlearning_accuracy(pred: Sequence[str], concept: str) -> float:
    """UA = share of forget-prompt images whose predicted label (on the erased factor) is not ``concept``."""
    if len(pred) == 0:
        raise ValueError("unlearning_accuracy needs at least one prediction")
    return float(np.mean([p != concept for p in pred]))


def in_domain_retain_accuracy(pred: Sequence[str], expected: Sequence[str], concept: str) -> float:
    """IRA = accuracy on the erased factor over images of prompts naming another concept of that factor.

    Images whose expected label is ``concept`` itself (or ``None``) are not part of IRA and are ignored.
    """
    _check_lengths(pred, expected, "in_domain_retain_accuracy")
    scored = [(p, e) for p, e in zip(pred, expected) if e is not None and e != concept]
    if not scored:
        raise ValueError(f"in_domain_retain_accuracy: no image expects a concept other than {concept!r}")
    return float(np.mean([p == e for p, e in scored]))


def cross_domain_retain_accuracy(pred: Mapping[str, Sequence[str]], expected: Mapping[str, Sequence[str | None]],
                                 concept_factor: str) -> float:
    """CRA = accuracy on every factor other than ``concept_factor``, pooled over (image, factor) pairs."""
    factors = [f for f in expected if f != concept_factor]
    hits = _factor_hits(pred, expected, factors)
    correct = sum(c for c, _ in hits.values())
    scored = sum(n for _, n in hits.values())
    if scored == 0:
        raise ValueError(f"cross_domain_retain_accuracy: no expected label for any factor other than "
                         f"{concept_factor!r}")
    return correct / scored
