"""The shipped oracle: accuracy on fresh renders, determinism, input formats, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkit.zoo import load_reference_classifier
from diffkit.zoo.classifier import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ClassifierConfig,
    ShapesClassifier,
    load_classifier,
    save_classifier,
)
from diffkit.zoo.shapes import FACTORS, render, sample_spec
from diffkit.zoo.train_classifier import TrainConfig, main, train_classifier


@pytest.fixture(scope="module")
def oracle():
    return load_reference_classifier()


@pytest.fixture(scope="module")
def fresh():
    """256 fresh renders (a seed used neither in training nor in the training-time evaluation) + specs."""
    rng = np.random.default_rng(20_251_125)
    specs = [sample_spec(rng) for _ in range(256)]
    return np.stack([render(s) for s in specs]), specs


def test_oracle_reads_every_factor_of_fresh_renders(oracle, fresh):
    images, specs = fresh
    pred = oracle.classify(images)
    for factor in FACTORS:
        acc = np.mean([p == getattr(s, factor) for p, s in zip(pred.labels[factor], specs)])
        assert acc >= 0.98, f"{factor} accuracy {acc:.3f} < 0.98"
    assert list(oracle.factors.items()) == list(FACTORS.items()) and not oracle.training  # same order


def test_classification_fields_and_features(oracle, fresh):
    images = fresh[0][:8]
    pred = oracle.classify(images)
    for factor, labels in FACTORS.items():
        p = pred.probs[factor]
        assert p.shape == (8, len(labels))
        torch.testing.assert_close(p.sum(-1), torch.ones(8))
        assert pred.indices[factor].tolist() == p.argmax(-1).tolist()
        assert pred.labels[factor] == [labels[i] for i in pred.indices[factor].tolist()]
    feats = oracle.features(images)
    assert feats.shape == (8, oracle.config.feature_dim) and feats.dtype == torch.float32
    # batching does not change the result
    torch.testing.assert_close(oracle.features(images, batch_size=3), feats)


def test_every_input_format_gives_the_same_answer(oracle, fresh):
    images = fresh[0][:6]
    ref = oracle.classify(images)
    t01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    forms = [
        ([Image.fromarray(im) for im in images], {}),
        (torch.from_numpy(images), {}),
        (list(images), {}),
        (t01, {"value_range": (0, 1)}),
        (t01 * 2 - 1, {"value_range": (-1, 1)}),
        (t01.permute(0, 2, 3, 1).numpy(), {"value_range": (0, 1)}),
    ]
    for form, kwargs in forms:
        got = oracle.classify(form, **kwargs)
        assert got.labels == ref.labels
        for f in FACTORS:
            torch.testing.assert_close(got.probs[f], ref.probs[f], atol=1e-5, rtol=1e-4)
    # other sizes are resized to 64 x 64 (here: a nearest-neighbour 2x upscale of the same images)
    big = [Image.fromarray(im).resize((128, 128), Image.NEAREST) for im in images]
    assert oracle.classify(big).labels["color"] == ref.labels["color"]


def test_bad_inputs_are_clear_errors(oracle, tmp_path):
    with pytest.raises(ValueError, match=r"need an explicit value_range=\(0, 1\) or \(-1, 1\)"):
        oracle.classify(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="outside the stated value_range"):
        oracle.features(torch.rand(2, 3, 64, 64) * 255, value_range=(0, 1))
    with pytest.raises(ValueError, match="PIL images must be RGB"):
        oracle.classify([Image.new("RGBA", (64, 64))])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        oracle.classify(np.zeros((1, 64, 64, 3), np.uint8), batch_size=0)
    with pytest.raises(FileNotFoundError, match="has no config.json; train one with: python -m"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="factor 'color' needs at least 2 distinct labels"):
        ClassifierConfig(factors={"color": ("red",)})
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        TrainConfig(steps=0)


def test_train_cli_rejects_bad_values(capsys):
    assert main(["--steps", "0", "--out", "unused"]) == 2
    assert "train_classifier: error: steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["--threads", "0", "--out", "unused"]) == 2
    assert "train_classifier: error: --threads must be >= 1, got 0" in capsys.readouterr().err


def test_training_is_deterministic_and_saves_atomically(tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=3, batch_size=8, eval_n=16)
    a = train_classifier(cfg, progress=False)
    b = train_classifier(cfg, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    save_classifier(a, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["factors"] == {k: list(v) for k, v in FACTORS.items()}  # names and label order
    assert config["train"]["config"]["steps"] == 3
    loaded = load_classifier(tmp_path)
    assert isinstance(loaded, ShapesClassifier) and not loaded.training
    x = torch.rand(4, 3, 64, 64)
    a.eval()
    torch.testing.assert_close(loaded.features(x, value_range=(0, 1)), a.features(x, value_range=(0, 1)))
