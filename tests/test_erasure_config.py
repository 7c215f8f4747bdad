"""ErasureConfig: method defaults, YAML loading, and every validation message."""

from __future__ import annotations

import pytest

from diffkit.erasure import ErasureConfig


def test_method_defaults_fill_unset_fields():
    esd = ErasureConfig(method="esd", concept="red")
    assert (esd.parameters, esd.batch_size, esd.lr, esd.eta) == ("esd-x", 1, 1e-5, 1.0)
    assert esd.concept == ("red",) and esd.anchor == ""
    salun = ErasureConfig(method="salun", concept=["red", "crimson"], retain_prompts=["a blue circle"])
    assert (salun.parameters, salun.batch_size, salun.saliency_fraction, salun.beta) == ("unet-all", 8, 0.5, 0.5)
    assert salun.concept == ("red", "crimson")
    assert ErasureConfig(method="esd", concept="red", batch_size=4).batch_size == 4


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="foo"), "method must be one of ['advunlearn', 'doco', 'esd', 'salun'], got 'foo'"),
        (dict(concept=[]), "concept must name at least one prompt"),
        (dict(concept=["red", " "]), "concept must not contain empty prompts"),
        (dict(concept=[3]), "concept must hold strings, got 3"),
        (dict(anchor=None), "anchor must be a string, got None"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(steps=2.5), "steps must be an integer >= 1, got 2.5"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(seed=-1), "seed must be an integer in [0, 2**63), got -1"),
        (dict(eta=0), "eta must be > 0, got 0"),
        (dict(beta=-0.1), "beta must be >= 0, got -0.1"),
        (dict(saliency_fraction=0), "saliency_fraction must be in (0, 1], got 0"),
        (dict(saliency_fraction=1.5), "saliency_fraction must be in (0, 1], got 1.5"),
        (dict(sample_steps=0), "sample_steps must be an integer in [1, 1000], got 0"),
        (dict(num_images=0), "num_images must be an integer >= 1, got 0"),
        (dict(resolution=4), "resolution must be an integer >= 8 (pixels), got 4"),
        (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1, got 0"),
        (dict(mixed_precision="fp8"), "mixed_precision must be one of ('no', 'fp16', 'bf16'), got 'fp8'"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be true or false, got 'yes'"),
        (dict(parameters="attn"), "parameters must be one of ['esd-all', 'esd-u', 'esd-x', 'esd-x-strict', "
                                  "'text-encoder', 'unet-all'] or a list of regular expressions, got 'attn'"),
        (dict(parameters=["("]), "parameters: invalid regular expression '('"),
        (dict(options={"gamma": 1}), "options ['gamma'] are not known to method 'esd'; allowed: none"),
        (dict(method="salun"), "method 'salun' needs retain_prompts when beta > 0"),
    ],
)
def test_bad_values_name_the_parameter(changes, message):
    kw = {"method": "esd", "concept": "red", **changes}
    with pytest.raises(ValueError) as e:
        ErasureConfig(**kw)
    assert message in str(e.value)


def test_salun_without_retain_is_fine_with_beta_zero():
    # SalUn's random label needs a concrete substitute: given here, as no retain prompt can serve as one.
    assert ErasureConfig(method="salun", concept="red", anchor="green", beta=0.0).retain_prompts == ()
    with pytest.raises(ValueError, match="method 'salun' needs a substitute concept: give anchor"):
        ErasureConfig(method="salun", concept="red", beta=0.0)


def test_yaml_roundtrip_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("method: salun\nconcept: [red, crimson]\nretain_prompts: [a blue circle]\n"
                    "steps: 7\nparameters: ['unet\\.down_blocks\\..*']\n")
    cfg = ErasureConfig.from_yaml(path, steps=9, lr=None)
    assert cfg.method == "salun" and cfg.steps == 9 and cfg.concept == ("red", "crimson")
    assert cfg.parameters == ("unet\\.down_blocks\\..*",)
    again = ErasureConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()


def test_config_hash_ignores_checkpoint_interval_only():
    a = ErasureConfig(concept="red")
    assert a.config_hash() == a.replace(checkpoint_every=7).config_hash()
    assert a.config_hash() != a.replace(steps=201).config_hash()
    assert a.config_hash() != a.replace(seed=1).config_hash()


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: esd\nconcept: red\nsteps_: 3\n", "unknown erasure job field(s) ['steps_']; allowed: method, concept"),
        ("- a\n- b\n", "must hold a mapping of fields, got list"),
        ("method: [unclosed\n", "is not valid YAML"),
    ],
)
def test_yaml_errors(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        ErasureConfig.from_yaml(path)
    assert message in str(e.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read job file .*nope.yaml"):
        ErasureConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="must be a mapping of fields, got list"):
        ErasureConfig.from_dict([1])
