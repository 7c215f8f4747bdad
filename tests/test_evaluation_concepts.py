"""evaluate_concepts and erasure_report on a stand-in pipeline that renders what the prompt names.

The stand-in's images are exact shapes-world renders, so the oracle reads them (>= 98% per factor), and an
"erased" stand-in that draws red things blue must score UA = 1 with retained concepts untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffkit.evaluation import (
    PromptSpec,
    concept_accuracy,
    erasure_report,
    evaluate_concepts,
    kid,
    shapes_erasure_prompts,
    shapes_prompt_specs,
    wilson_interval,
)
from diffkit.zoo import load_reference_classifier
from diffkit.zoo.shapes import EVAL_ONLY, forget_words, render, sample_spec


class RenderPipe:
    """A text-to-image stand-in: looks the prompt up in ``table`` and renders it, placed by the seed."""

    device = torch.device("cpu")

    def __init__(self, table: dict[str, dict], recolor: dict[str, str] | None = None):
        self.table, self.recolor, self.calls = table, recolor or {}, []

    def __call__(self, prompt, generator, output_type, num_images_per_prompt, **kwargs):
        assert output_type == "np" and num_images_per_prompt == 1 and len(prompt) == len(generator)
        self.calls.append((list(prompt), kwargs))
        out = []
        for p, g in zip(prompt, generator):
            labels = dict(self.table[p])
            if "color" in labels:
                labels["color"] = self.recolor.get(labels["color"], labels["color"])
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
            out.append(render(sample_spec(rng, **labels)).astype(np.float32) / 255)
        return SimpleNamespace(images=np.stack(out))


@pytest.fixture(scope="module")
def oracle():
    return load_reference_classifier()


def test_evaluate_concepts_generates_classifies_and_scores(oracle):
    specs = shapes_prompt_specs(6, seed=1)
    pipe = RenderPipe({s.prompt: s.labels for s in specs})
    res = evaluate_concepts(pipe, oracle, specs, seeds=[0, 1], batch_size=4, progress=False, num_inference_steps=3)
    assert res.n_images == 12 and res.seeds == [0, 1] * 6
    assert res.prompts == [s.prompt for s in specs for _ in range(2)]
    assert res.images.shape == (12, 64, 64, 3) and res.features.shape == (12, oracle.config.feature_dim)
    assert set(res.accuracy) == {"object", "color", "style"}  # background is never named by these prompts
    assert res.accuracy == {"object": 1.0, "color": 1.0, "style": 1.0}
    assert res.accuracy == concept_accuracy(res.predicted, res.expected)
    assert all(kw == {"num_inference_steps": 3} for _, kw in pipe.calls)  # call kwargs reach the pipeline
    assert res.to_json()["n_images"] == 12 and 0 < res.to_json()["mean_saturation"] < 1


def test_erasure_report_of_a_perfect_erasure(oracle):
    groups = shapes_erasure_prompts("red", n=6, seed=0)
    table = {s.prompt: s.labels for g in groups.values() for s in g}
    original = RenderPipe(table)
    erased = RenderPipe(table, recolor={"red": "blue"})  # red things come out blue; nothing else changes
    rep = erasure_report(original, erased, oracle, "color", "red", groups["forget"], groups["synonyms"],
                         groups["retain"], seeds=[0, 1], batch_size=8, progress=False)
    assert rep["n_images"] == {"forget": 12, "synonyms": 12, "retain": 12}
    assert (rep["ua"], rep["ua_synonyms"], rep["ira"], rep["cra"], rep["cra_forget"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert rep["original"] == {"ua": 0.0, "cra_forget": 1.0, "ua_synonyms": 0.0, "ira": 1.0, "cra": 1.0}
    o = rep["outcomes"]
    assert o["ua"] == [1] * 12 and o["ua_synonyms"] == [1] * 12 and o["ira"] == [1] * 12
    assert all(c == s for c, s in o["cra"]) and sum(s for _, s in o["cra"]) > 0
    assert rep["ci95"]["ua"] == pytest.approx(list(wilson_interval(12, 12)))
    assert rep["ci95"]["cra"] == [1.0, 1.0]
    # retain images are identical -> PSNR undefined (all pairs identical), KID is that of a set with itself
    assert rep["identical_retain_images"] == 12 and rep["psnr_retain"] is None
    prompts = [s.prompt for s in groups["retain"] for _ in (0, 1)]
    gens = [torch.Generator().manual_seed(seed) for _ in groups["retain"] for seed in (0, 1)]
    retain_images = RenderPipe(table)(prompts, gens, "np", 1).images
    feats = oracle.features(retain_images, value_range=(0, 1))
    # KID over subsets of half the 12 retain images, so that its spread over subsets is informative
    assert (rep["kid"], rep["kid_std"]) == pytest.approx(kid(feats, feats, subset_size=6), rel=1e-5)
    assert rep["kid_std"] > 0


def test_shapes_erasure_prompts_use_forget_and_eval_only_words():
    groups = shapes_erasure_prompts("star", n=6, seed=0)
    held = EVAL_ONLY["star"]
    for s in groups["forget"]:
        assert s.labels["object"] == "star" and held not in s.prompt
        assert any(w in s.prompt for w in forget_words("star"))
    assert all(held in s.prompt and s.labels["object"] == "star" for s in groups["synonyms"])
    assert all(s.labels["object"] != "star" and "color" in s.labels for s in groups["retain"])
    with pytest.raises(ValueError, match="only objects, colors and styles have evaluation-only synonyms"):
        shapes_erasure_prompts("gray")


def test_bad_prompt_specs_and_concepts(oracle):
    pipe = RenderPipe({})
    cases = [
        (dict(prompt_specs="a red star"), "not a single one"),
        (dict(prompt_specs=[("a red star", {"colour": "red"})]), "unknown factor 'colour'"),
        (dict(prompt_specs=[("a red star", {"color": "maroon"})]), "'maroon' is not a color label"),
        (dict(prompt_specs=["a red star"]), "has no labels"),
        (dict(prompt_specs=[]), "no prompt specs given"),
        (dict(prompt_specs=[PromptSpec("a red star", {"color": "red"})], seeds=[]), "seeds is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_concepts(pipe, oracle, progress=False, **kwargs)
    ok = [PromptSpec("a red star", {"color": "red"})]
    retain = [PromptSpec("a blue star", {"color": "blue", "object": "star"})]
    with pytest.raises(ValueError, match="concept_factor must be one of object, color, style, background"):
        erasure_report(pipe, pipe, oracle, "hue", "red", ok, ok, retain)
    with pytest.raises(ValueError, match="concept must be a color label"):
        erasure_report(pipe, pipe, oracle, "color", "star", ok, ok, retain)
    with pytest.raises(ValueError, match="retain prompts must not name the erased concept 'red'"):
        erasure_report(pipe, pipe, oracle, "color", "red", ok, ok, ok)
    with pytest.raises(ValueError, match="synonyms prompts must be labelled color='red'"):
        erasure_report(pipe, pipe, oracle, "color", "red", ok, retain, retain)


def test_erasure_outcomes_and_intervals_on_constructed_predictions():
    from diffkit.evaluation.concepts import ConceptResult, erasure_outcomes, outcome_intervals

    def result(expected, predicted):
        n = len(next(iter(expected.values())))
        return ConceptResult({}, [""] * n, [0] * n, expected, predicted, 0.0, np.zeros(0), np.zeros(0))

    res = {
        "forget": result({"color": ["red"] * 4}, {"color": ["red", "blue", "red", "green"]}),
        "synonyms": result({"color": ["red"] * 2}, {"color": ["blue", "blue"]}),
        "retain": result({"color": ["blue", "red", None], "object": ["star", "circle", "square"]},
                         {"color": ["blue", "blue", "green"], "object": ["star", "square", "square"]}),
    }
    o = erasure_outcomes(res, "color", "red")
    assert o == {"ua": [0, 1, 0, 1], "ua_synonyms": [1, 1], "ira": [1, None, None], "cra": [[1, 1], [0, 1], [1, 1]]}
    ci = outcome_intervals(o)
    assert ci["ua"] == pytest.approx(list(wilson_interval(2, 4)))
    assert ci["ira"] == pytest.approx(list(wilson_interval(1, 1)))
    lo, hi = ci["cra"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1  # bootstrap over the three images around the pooled 2/3
