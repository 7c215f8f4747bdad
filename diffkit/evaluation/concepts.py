"""Generate-and-classify helpers: concept accuracy of a pipeline, and the erasure report (UA / IRA / CRA / KID).

A *prompt spec* is ``(prompt, labels)`` where ``labels`` maps the factors the prompt names to their
canonical label, e.g. ``("a crimson star", {"color": "red", "object": "star"})``. Factors the prompt
leaves open are simply absent and are not scored. ``PromptSpec`` is the same as a named tuple.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .accuracy import concept_accuracy, cross_domain_retain_accuracy, in_domain_retain_accuracy, unlearning_accuracy
from .generation import generate_images
from .kid import kid
from .psnr import psnr
from .saturation import image_saturation


class PromptSpec(NamedTuple):
    """A prompt and the canonical label of every factor it names."""

    prompt: str
    labels: Mapping[str, str]


def as_specs(items, factors: Mapping[str, Sequence[str]], default_labels: Mapping[str, str] | None = None
             ) -> list[PromptSpec]:
    """Normalise prompt specs: ``(prompt, labels)`` pairs, or bare prompts labelled with ``default_labels``."""
    single = isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str) and \
        isinstance(items[1], Mapping)
    if isinstance(items, str) or single:
        raise ValueError("prompt specs must be a list of (prompt, labels) pairs or of prompts, not a single one")
    out = []
    for item in items:
        if isinstance(item, str):
            if default_labels is None:
                raise ValueError(f"prompt {item!r} has no labels; give (prompt, {{factor: label}}) pairs")
            prompt, labels = item, dict(default_labels)
        elif isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str) and \
                isinstance(item[1], Mapping):
            prompt, labels = item[0], dict(item[1])
        else:
            raise ValueError(f"a prompt spec must be (prompt, {{factor: label}}) or a prompt string, got {item!r}")
        for f, label in labels.items():
            if f not in factors:
                raise ValueError(f"prompt {prompt!r}: unknown factor {f!r}; the classifier knows {sorted(factors)}")
            if label not in factors[f]:
                raise ValueError(f"prompt {prompt!r}: {label!r} is not a {f} label; allowed: {', '.join(factors[f])}")
        out.append(PromptSpec(prompt, labels))
    if not out:
        raise ValueError("no prompt specs given")
    return out


def _expand(specs: list[PromptSpec], seeds: Sequence[int]) -> tuple[list[str], list[int], list[PromptSpec]]:
    """Every spec with every seed, spec-major."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed per prompt")
    rows = [(spec, s) for spec in specs for s in seeds]
    return [r[0].prompt for r in rows], [r[1] for r in rows], [r[0] for r in rows]


@dataclass
class ConceptResult:
    """What ``evaluate_concepts`` measured; ``to_json()`` drops the images and features."""

    accuracy: dict[str, float]
    prompts: list[str]
    seeds: list[int]
    expected: dict[str, list[str | None]]
    predicted: dict[str, list[str]]
    mean_saturation: float
    images: np.ndarray = field(repr=False)
    features: np.ndarray = field(repr=False)

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    def to_json(self) -> dict:
        return dict(accuracy=self.accuracy, n_images=self.n_images, mean_saturation=self.mean_saturation)


def classify_specs(classifier, images: np.ndarray, specs: Sequence[PromptSpec]) -> ConceptResult:
    """Classify generated ``images`` (uint8, one per spec) and score them against the specs' labels."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} prompt specs")
    factors = classifier.factors
    pred = classifier.classify(images)
    expected = {f: [s.labels.get(f) for s in specs] for f in factors}
    return ConceptResult(
        accuracy=concept_accuracy(pred.labels, expected),
        prompts=[s.prompt for s in specs],
        seeds=[],
        expected=expected,
        predicted=pred.labels,
        mean_saturation=float(image_saturation(images).mean()),
        images=images,
        features=classifier.features(images).numpy(),
    )


def evaluate_concepts(pipe, classifier, prompt_specs, seeds: Sequence[int] = (0,), batch_size: int = 8,
                      progress: bool = True, desc: str = "evaluate", **call_kwargs) -> ConceptResult:
    """Generate every prompt spec with every seed, classify, and return per-factor accuracy.

    ``call_kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``guidance`` ...).
    """
    specs = as_specs(prompt_specs, classifier.factors)
    prompts, seed_list, rows = _expand(specs, seeds)
    images = generate_images(pipe, prompts, seed_list, batch_size=batch_size, progress=progress, desc=desc,
                             **call_kwargs)
    result = classify_specs(classifier, images, rows)
    result.seeds = seed_list
    return result


def _group_metrics(res: ConceptResult, factor: str, concept: str, kind: str) -> dict[str, float]:
    if kind == "forget":
        out = {"ua": unlearning_accuracy(res.predicted[factor], concept)}
        others = {f: v for f, v in res.expected.items() if f != factor}
        if any(label is not None for v in others.values() for label in v):
            out["cra_forget"] = cross_domain_retain_accuracy(res.predicted, res.expected, factor)
        return out
    return {"ira": in_domain_retain_accuracy(res.predicted[factor], res.expected[factor], concept),
            "cra": cross_domain_retain_accuracy(res.predicted, res.expected, factor)}


def erasure_outcomes(res: dict[str, ConceptResult], factor: str, concept: str) -> dict[str, list]:
    """Per-image outcomes behind UA, UA (synonyms), IRA and CRA, in prompt x seed order (for intervals and
    paired comparisons of two models on the same prompts and seeds).

    ``ua`` / ``ua_synonyms``: 1 where the image is *not* read as ``concept``; ``ira``: 1 where the erased
    factor is read right, None for images IRA does not score; ``cra``: per image ``[correct, scored]`` over
    the other factors (CRA pools these pairs).
    """
    def hits(r: ConceptResult):
        return [int(p != concept) for p in r.predicted[factor]]

    retain = res["retain"]
    ira = [None if e is None or e == concept else int(p == e)
           for p, e in zip(retain.predicted[factor], retain.expected[factor])]
    others = [f for f in retain.expected if f != factor]
    cra = []
    for i in range(retain.n_images):
        scored = [f for f in others if retain.expected[f][i] is not None]
        cra.append([sum(int(retain.predicted[f][i] == retain.expected[f][i]) for f in scored), len(scored)])
    return {"ua": hits(res["forget"]), "ua_synonyms": hits(res["synonyms"]), "ira": ira, "cra": cra}


def outcome_intervals(outcomes: dict[str, list]) -> dict[str, list[float]]:
    """95% intervals of the rates of :func:`erasure_outcomes`: Wilson for UA and IRA (one outcome per image),
    a bootstrap over images for CRA (several factors per image are not independent)."""
    from .stats import bootstrap_interval, wilson_interval

    out = {}
    for key in ("ua", "ua_synonyms", "ira"):
        scored = [h for h in outcomes[key] if h is not None]
        out[key] = list(wilson_interval(sum(scored), len(scored)))
    pairs = np.asarray(outcomes["cra"], dtype=np.float64).reshape(-1, 2)
    keep = pairs[:, 1] > 0
    if keep.any():
        index = np.flatnonzero(keep)
        ratio = lambda ix: pairs[ix.astype(int), 0].sum() / pairs[ix.astype(int), 1].sum()
        out["cra"] = list(bootstrap_interval(index.astype(np.float64), ratio))
    return out


def kid_subset_size(n_a: int, n_b: int) -> int:
    """KID's subset size for sets of ``n_a`` and ``n_b`` features: half the smaller set, at most 1000 (the
    KID paper's subsets), at least 2."""
    return max(2, min(1000, min(n_a, n_b) // 2))


def erasure_report(original_pipe, erased_pipe, classifier, concept_factor: str, concept: str, forget_prompts,
                   synonym_prompts, retain_prompts, seeds: Sequence[int] = (0,), batch_size: int = 8,
                   kid_subsets: int = 100, progress: bool = True, **call_kwargs) -> dict:
    """The UnlearnCanvas metrics of an erasure, measured by the oracle, plus utility against the original.

    * ``forget_prompts``: prompts naming the concept with the words the erasure was given;
    * ``synonym_prompts``: prompts naming it only with its evaluation-only synonym(s);
    * ``retain_prompts``: prompts naming other concepts, with the labels of every factor they name.

    Bare prompt strings in the forget / synonym lists are labelled ``{concept_factor: concept}``.
    Returns ``ua`` (forget words), ``ua_synonyms``, ``ira``, ``cra``, ``cra_forget`` (other factors kept in
    forget images, when the forget specs name them), ``kid`` / ``kid_std`` of the erased model's retain
    images against the original's (same prompts and seeds; mean and standard deviation over ``kid_subsets``
    random subsets of :func:`kid_subset_size` images, in the oracle's raw feature units), ``psnr_retain`` (mean
    PSNR of those pairs, dB),
    and the same accuracy metrics for the original model under ``"original"`` (the baseline); ``outcomes``
    (per image, :func:`erasure_outcomes`) and ``ci95`` (95% intervals of UA, UA synonyms, IRA and CRA).
    """
    factors = classifier.factors
    if concept_factor not in factors:
        raise ValueError(f"concept_factor must be one of {', '.join(factors)}, got {concept_factor!r}")
    if concept not in factors[concept_factor]:
        raise ValueError(f"concept must be a {concept_factor} label ({', '.join(factors[concept_factor])}), "
                         f"got {concept!r}")
    default = {concept_factor: concept}
    groups = {
        "forget": as_specs(forget_prompts, factors, default),
        "synonyms": as_specs(synonym_prompts, factors, default),
        "retain": as_specs(retain_prompts, factors),
    }
    for name in ("forget", "synonyms"):
        wrong = [s.prompt for s in groups[name] if s.labels.get(concept_factor) != concept]
        if wrong:
            raise ValueError(f"{name} prompts must be labelled {concept_factor}={concept!r}; not: {wrong[:3]}")
    leaked = [s.prompt for s in groups["retain"] if s.labels.get(concept_factor) == concept]
    if leaked:
        raise ValueError(f"retain prompts must not name the erased concept {concept!r}: {leaked[:3]}")

    def run(pipe, which: str, names) -> dict[str, ConceptResult]:
        out = {}
        for name in names:
            prompts, seed_list, rows = _expand(groups[name], seeds)
            images = generate_images(pipe, prompts, seed_list, batch_size=batch_size, progress=progress,
                                     desc=f"{which}/{name}", **call_kwargs)
            out[name] = classify_specs(classifier, images, rows)
        return out

    erased = run(erased_pipe, "erased", ("forget", "synonyms", "retain"))
    original = erased if erased_pipe is original_pipe else run(original_pipe, "original", ("forget", "synonyms",
                                                                                              "retain"))

    def metrics(res: dict[str, ConceptResult]) -> dict[str, float]:
        m = _group_metrics(res["forget"], concept_factor, concept, "forget")
        m["ua_synonyms"] = unlearning_accuracy(res["synonyms"].predicted[concept_factor], concept)
        m.update(_group_metrics(res["retain"], concept_factor, concept, "retain"))
        return m

    report = dict(concept=concept, factor=concept_factor, seeds=[int(s) for s in seeds],
                  n_images={k: v.n_images for k, v in erased.items()}, **metrics(erased))
    ka, kb = erased["retain"].features, original["retain"].features
    # subsets of half the set (at most the paper's 1000): a subset as large as the set would make every subset
    # the same images, and the spread over subsets (kid_std) would be 0 whatever the noise of the estimate
    report["kid"], report["kid_std"] = kid(ka, kb, subset_size=kid_subset_size(len(ka), len(kb)),
                                           n_subsets=kid_subsets)
    pairs = psnr(erased["retain"].images, original["retain"].images)
    finite = pairs[pairs.isfinite()]
    # identical pairs have infinite PSNR; report the mean over the differing pairs and how many were identical
    report["psnr_retain"] = float(finite.mean()) if len(finite) else None
    report["identical_retain_images"] = int((~pairs.isfinite()).sum())
    report["original"] = metrics(original)
    report["outcomes"] = erasure_outcomes(erased, concept_factor, concept)
    report["ci95"] = outcome_intervals(report["outcomes"])
    return report


# -- prompt sets from the shapes world ---------------------------------------------------------------

def _with_word(prompt: str, canonical: str, word: str) -> str:
    return re.sub(rf"\b{re.escape(canonical)}\b", word, prompt, count=1)


def shapes_prompt_specs(n: int, seed: int = 0, heldout_only: bool = False, words: str = "canonical",
                        factors: Sequence[str] = ("object", "color", "style")) -> list[PromptSpec]:
    """``n`` random shapes-world prompt specs naming ``factors`` (canonical or evaluation-only words)."""
    from ..zoo.shapes import HELDOUT, prompt_for, sample_spec

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    heldout = sorted(HELDOUT)
    while len(out) < n:
        if heldout_only:
            o, c, s = heldout[int(rng.integers(len(heldout)))]
            spec = sample_spec(rng, object=o, color=c, style=s)
        else:
            spec = sample_spec(rng)
        labels = {f: getattr(spec, f) for f in factors}
        out.append(PromptSpec(prompt_for(**labels, words=words), labels))
    return out


def shapes_erasure_prompts(concept: str, n: int = 8, seed: int = 0) -> dict[str, list[PromptSpec]]:
    """Forget / synonym / retain prompt specs (``n`` each) for erasing a shapes-world ``concept``.

    Forget prompts cycle through ``forget_words(concept)``, synonym prompts use its evaluation-only word;
    both also name a random value of a second factor (object, or color when erasing an object), which CRA
    on forget images checks. Retain prompts name another concept of the same factor and a second factor.
    """
    from ..zoo.shapes import EVAL_ONLY, FACTORS, factor_of, forget_words, prompt_for

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    factor = factor_of(concept)
    if concept not in EVAL_ONLY:
        raise ValueError(f"concept {concept!r} ({factor}) cannot be erased: only objects, colors and styles have "
                         "evaluation-only synonyms")
    other = "color" if factor == "object" else "object"
    rng = np.random.default_rng(seed)
    words = forget_words(concept)
    rivals = [c for c in FACTORS[factor] if c != concept]

    def spec(value: str, word: str | None = None) -> PromptSpec:
        labels = {factor: value, other: FACTORS[other][int(rng.integers(len(FACTORS[other])))]}
        prompt = prompt_for(**labels)
        return PromptSpec(_with_word(prompt, value, word) if word else prompt, labels)

    return {
        "forget": [spec(concept, words[i % len(words)]) for i in range(n)],
        "synonyms": [spec(concept, EVAL_ONLY[concept]) for _ in range(n)],
        "retain": [spec(rivals[i % len(rivals)]) for i in range(n)],
    }
