"""Robustness of an erasure, read by the oracle: attack success and probe recovery rates with intervals.

The attacks (``diffkit.erasure.attack``: UnlearnDiffAtk by default, the soft prompt as the stronger one) and
the non-text probes (``diffkit.erasure.probes``: initial-noise search, completion from a partly noised
concept image) take the oracle as plain callables; this module builds them from a ``ShapesClassifier``-like
oracle (``classify(images, value_range=(0, 1))``) and turns each report's per-item hits into a
:class:`~diffkit.evaluation.stats.Rate` (k, n and the 95% Wilson interval).

    report = robustness_report(erased, oracle, "object", "star", prompts, targets, concept_latents)
    report["attack"]["rate"]     # {"k": .., "n": .., "rate": .., "ci95": [lo, hi]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..erasure.attack import AttackConfig, attack_success_rate
from ..erasure.probes import CompletionConfig, NoiseSearchConfig, completion_probe, noise_search_probe
from ..erasure.unlearndiffatk import UnlearnDiffAtkConfig
from .stats import Rate, rate

PROBES = ("noise-search", "completion")


def concept_judge(oracle, factor: str, concept: str) -> Callable[[torch.Tensor], list[bool]]:
    """images (B, 3, H, W) in [0, 1] -> [does the oracle read ``concept`` for ``factor``?]."""
    def judge(images):
        return [lab == concept for lab in oracle.classify(images, value_range=(0, 1)).labels[factor]]
    return judge


def concept_score(oracle, factor: str, concept: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> (B,) the oracle's probability of ``concept`` for ``factor`` (the noise search's ranking)."""
    index = list(oracle.factors[factor]).index(concept)

    def score(images):
        return oracle.classify(images, value_range=(0, 1)).probs[factor][:, index]
    return score


def hit_rate(report) -> Rate:
    """The rate of an attack or probe report's hits (k, n, 95% Wilson interval)."""
    return rate(report.hits)


def robustness_report(
    erased,
    oracle,
    factor: str,
    concept: str,
    attack_prompts: Sequence[str],
    target_latents: torch.Tensor,
    concept_latents: torch.Tensor | None = None,
    *,
    attack: str = "unlearndiffatk",
    attack_config: AttackConfig | UnlearnDiffAtkConfig | None = None,
    probes: Sequence[str] = PROBES,
    noise_config: NoiseSearchConfig | None = None,
    completion_config: CompletionConfig | None = None,
) -> dict:
    """Attack success on ``attack_prompts`` (``target_latents``: one concept image's latents each) and each
    probe on (erased) ``erased``: the noise search over the same prompts, the completion over
    ``concept_latents`` (default: ``target_latents``). Returns JSON-ready {name: {"rate": Rate JSON, ...}}
    (the attack's also "pre_attack_rate"; the completion's "levels": a Rate per strength)."""
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"probes must be among {PROBES}, got {unknown}")
    noise_config = NoiseSearchConfig() if noise_config is None else noise_config
    completion_config = CompletionConfig() if completion_config is None else completion_config
    judge = concept_judge(oracle, factor, concept)
    out = {}
    a = attack_success_rate(erased, attack_prompts, judge, target_latents, attack_config, attack=attack)
    out["attack"] = {**a.to_dict(), "rate": hit_rate(a).to_json(), "pre_attack_rate": rate(a.pre_attack).to_json()}
    if "noise-search" in probes:
        r = noise_search_probe(erased, attack_prompts, judge, concept_score(oracle, factor, concept), noise_config)
        out["noise-search"] = {**r.to_dict(), "rate": hit_rate(r).to_json()}
    if "completion" in probes:
        latents = target_latents if concept_latents is None else concept_latents
        r = completion_probe(erased, latents, judge, completion_config)
        out["completion"] = {**r.to_dict(), "rate": hit_rate(r).to_json(),
                             "levels": {s: rate(h).to_json() for s, h in r.levels.items()}}
    return out
