"""The demo's form validation (diffkit.app.settings): pure functions, exact messages, no model."""

from __future__ import annotations

import pytest

from diffkit.app.settings import (
    MAX_PROMPT_CHARS,
    NONE_CHOICE,
    SCHEDULERS,
    DeepCacheSettings,
    GenerateSettings,
    GuidanceSettings,
    InputError,
    check_float,
    check_int,
    check_prompt,
    guider_scales,
    list_artifacts,
    resolve_artifact,
    suggest_erase_prompts,
    validate_deepcache,
    validate_edit,
    validate_erase,
    validate_generate,
    validate_guidance,
)


def test_prompt_messages():
    assert check_prompt("  a red star ") == "a red star"
    for empty in ("", "   ", None):
        with pytest.raises(InputError, match=r"^Please enter a prompt\.$"):
            check_prompt(empty)
    assert check_prompt("", "negative prompt", required=False) == ""
    with pytest.raises(InputError, match=rf"^The prompt is too long \({MAX_PROMPT_CHARS + 1} characters; "
                                         rf"at most {MAX_PROMPT_CHARS}\)\.$"):
        check_prompt("x" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(InputError, match=r"^Please enter a source prompt \(what the image shows\)\.$"):
        check_prompt(" ", "source prompt", " (what the image shows)")


def test_integers_accept_whole_floats_and_name_the_range():
    assert check_int(25.0, "Steps", 1, 100) == 25 and isinstance(check_int(25.0, "Steps", 1, 100), int)
    for bad, shown in ((0, "0"), (101, "101"), (-3.0, "-3"), (2.5, "2.5"), ("abc", "'abc'"), (None, "None"),
                       (float("nan"), "nan")):
        with pytest.raises(InputError) as e:
            check_int(bad, "Steps", 1, 100)
        assert str(e.value) == f"Steps must be a whole number between 1 and 100, got {shown}."


def test_floats():
    assert check_float("0.25", "eta", 0, 1) == 0.25
    with pytest.raises(InputError, match=r"^APG eta must be a number between 0 and 1, got 2\.0\.$"):
        check_float(2.0, "APG eta", 0, 1)
    with pytest.raises(InputError, match=r"between -inf and 3"):
        check_float(float("inf"), "x", None, 3)


def test_guidance_checks_only_the_chosen_method():
    g = validate_guidance("APG", 7.5, 10, 0.5, 0, -0.25, cfgpp_scale=5.0)  # CFG++ lambda unused: not checked
    assert g == GuidanceSettings("APG", 7.5, 10.0, 0.5, 0.0, -0.25, 5.0)
    with pytest.raises(InputError, match=r"^APG momentum must be a number between -0.999 and 0.999, got 1\.$"):
        validate_guidance("APG", apg_momentum=1)
    with pytest.raises(InputError, match=r"^CFG\+\+ lambda must be a number between 0 and 1, got 1\.5\.$"):
        validate_guidance("CFG++", cfgpp_scale=1.5)
    with pytest.raises(InputError, match=r"^Guidance method must be one of CFG, APG, CFG\+\+, Diffusers guider, "
                       r"got 'PAG'\.$"):
        validate_guidance("PAG")
    # The CFG scale is the baseline's in compare mode, so it is checked whatever the method.
    with pytest.raises(InputError, match=r"^CFG scale must be a number between 0 and 50, got -1\.$"):
        validate_guidance("CFG++", cfg_scale=-1)


def test_diffusers_guider_choice():
    from diffkit.guidance.diffusers_guiders import GUIDERS

    scales = guider_scales()
    assert list(scales) == list(GUIDERS)  # every guider the command line offers, by the same names
    assert scales["pag"] == ("PerturbedAttentionGuidance's perturbed_guidance_scale", 3.0)
    assert scales["mambo"] == ("MagnitudeAwareGuidance's guidance_scale", 10.0)
    g = validate_guidance("Diffusers guider", guider="tcfg", guider_scale="6.5")
    assert (g.method, g.guider, g.guider_scale) == ("Diffusers guider", "tcfg", 6.5)
    assert validate_guidance("Diffusers guider", guider="mambo", guider_scale=None).guider_scale == 10.0  # default
    assert validate_guidance("Diffusers guider", guider="seg", guider_scale=" ").guider_scale == 3.0
    with pytest.raises(InputError, match=r"^Diffusers guider must be one of pag, seg, skip-layer, .*, got 'sag'\.$"):
        validate_guidance("Diffusers guider", guider="sag")
    with pytest.raises(InputError, match=r"^pag scale must be a number between 0 and 50, got 60\.$"):
        validate_guidance("Diffusers guider", guider="pag", guider_scale=60)
    assert validate_guidance("CFG", guider="sag", guider_scale=99).guider == "sag"  # unused: not checked
    s = validate_generate("a star", method="Diffusers guider", guider="apg-mix", guider_scale=9)
    assert s.guidance.guider == "apg-mix" and "diffusers guider apg-mix 9" in s.describe()
    assert s.baseline().guidance == GuidanceSettings("CFG", cfg_scale=7.5)  # compare mode's baseline: plain CFG


def test_deepcache():
    assert validate_deepcache(False, interval=0) == DeepCacheSettings()  # off: its fields are ignored
    assert validate_deepcache(True, 5.0, 1, "non-uniform", steps=25) == DeepCacheSettings(True, 5, 1, "non-uniform")
    with pytest.raises(InputError, match=r"^DeepCache interval must be a whole number between 1 and 10, got 11\.$"):
        validate_deepcache(True, 11, 0, "uniform", steps=10)
    with pytest.raises(InputError, match=r"^DeepCache schedule must be one of uniform, non-uniform, got 'cosine'\.$"):
        validate_deepcache(True, 3, 0, "cosine")


def test_artifact_folders(tmp_path):
    assert list_artifacts(tmp_path / "missing") == [] and list_artifacts(None) == []
    for name in ("b-spec", "a-spec", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert list_artifacts(tmp_path) == ["a-spec", "b-spec"]
    assert resolve_artifact(NONE_CHOICE, tmp_path, "Pruning spec") is None
    assert resolve_artifact(None, tmp_path, "Pruning spec") is None
    assert resolve_artifact("a-spec", tmp_path, "Pruning spec") == str(tmp_path / "a-spec")
    with pytest.raises(InputError) as e:
        resolve_artifact("gone", tmp_path, "Erasure artifact")
    assert str(e.value) == (f"Erasure artifact 'gone' was not found in {str(tmp_path)!r} (it may have been removed; "
                            f"refresh the list).")
    with pytest.raises(InputError, match=r"^Pruning spec '\.\./a-spec' is not a folder name\.$"):
        resolve_artifact("../a-spec", tmp_path, "Pruning spec")
    with pytest.raises(InputError, match=r"^The Pruning spec folder .* does not exist"):
        resolve_artifact("a-spec", tmp_path / "missing", "Pruning spec")


def test_validate_generate_and_baseline(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "half").mkdir()
    s = validate_generate(" a red star ", "blurry", 7.0, 12.0, "Euler a", "CFG++", cfg_scale=5, cfgpp_scale=0.8,
                          deepcache=True, deepcache_interval=4, deepcache_branch=2, deepcache_schedule="uniform",
                          pruning="half", erasure=NONE_CHOICE, pruning_root=tmp_path / "p")
    assert s == GenerateSettings("a red star", "blurry", 7, 12, "Euler a",
                                 GuidanceSettings("CFG++", cfg_scale=5.0, cfgpp_scale=0.8),
                                 DeepCacheSettings(True, 4, 2, "uniform"), str(tmp_path / "p" / "half"), None)
    base = s.baseline()
    assert base == GenerateSettings("a red star", "blurry", 7, 12, "Euler a", GuidanceSettings("CFG", cfg_scale=5.0))
    assert base.describe() == "seed 7, Euler a, 12 steps, CFG 5"
    assert s.describe() == "seed 7, Euler a, 12 steps, CFG++ lambda 0.8, DeepCache N=4 branch 2 uniform, pruned (half)"
    with pytest.raises(InputError, match=r"^Steps must be a whole number between 1 and 100, got 0\.$"):
        validate_generate("a red star", steps=0)
    with pytest.raises(InputError, match=r"^Seed must be a whole number between 0 and 4294967295, got -1\.$"):
        validate_generate("a red star", seed=-1)
    with pytest.raises(InputError, match=r"^Scheduler must be one of DDIM, Euler, Euler a, DPM\+\+ 2M, PNDM, "
                                         r"got 'LMS'\.$"):
        validate_generate("a red star", scheduler="LMS")
    with pytest.raises(InputError, match=r"^Please enter a prompt\.$"):
        validate_generate("", steps=0)  # the prompt is reported first
    assert list(SCHEDULERS) == ["DDIM", "Euler", "Euler a", "DPM++ 2M", "PNDM"]


def test_validate_edit_and_erase():
    with pytest.raises(InputError, match=r"^Please upload an image to edit\.$"):
        validate_edit(None, "a red star", "a blue star")
    s = validate_edit(object(), "a red star", "a blue star", 0.7, 30.0)
    assert (s.source_prompt, s.target_prompt, s.scale, s.steps) == ("a red star", "a blue star", 0.7, 30)
    with pytest.raises(InputError, match=r"^Please enter a target prompt \(what it should become\)\.$"):
        validate_edit(object(), "a red star", "")
    with pytest.raises(InputError, match=r"^Erasure training is not available"):
        validate_erase("red", "esd", "a red star", "a blue star", methods=())
    with pytest.raises(InputError, match=r"^Erasure method must be one of esd, salun, got 'ablate'\.$"):
        validate_erase("red", "ablate", "a red star", "a blue star", methods=("esd", "salun"))
    with pytest.raises(InputError, match=r"^Erasure steps must be a whole number between 1 and 500, got 501\.$"):
        validate_erase("red", "esd", "a red star", "a blue star", steps=501, methods=("esd",))
    e = validate_erase(" red ", "esd", "a red star", "a blue star", 10, "  ", 5, 3, methods=("esd",))
    assert (e.concept, e.steps, e.lr, e.sample_steps, e.seed) == ("red", 10, None, 5, 3)
    assert validate_erase("red", "esd", "f", "r", lr=1e-4, methods=("esd",)).lr == 1e-4
    assert validate_erase("red", "esd", "f", "r", lr=" 1e-4 ", methods=("esd",)).lr == 1e-4
    with pytest.raises(InputError, match=r"^Learning rate must be a number between 1e-08 and 0\.1, got 'fast'\.$"):
        validate_erase("red", "esd", "f", "r", lr="fast", methods=("esd",))


def test_suggested_erase_prompts_change_only_the_erased_factor():
    assert suggest_erase_prompts("red") == ("a red solid star on a white background",
                                            "a green solid star on a white background")
    assert suggest_erase_prompts("moon") == ("a red solid moon on a white background",
                                             "a red solid circle on a white background")  # wraps around
    assert suggest_erase_prompts("striped") == ("a red striped star on a white background",
                                                "a red dotted star on a white background")
    assert suggest_erase_prompts("a dog") == ("a dog", "a blue solid square on a white background")
    assert suggest_erase_prompts("dog") == ("a dog", "a blue solid square on a white background")
    assert suggest_erase_prompts(None) == ("", "a blue solid square on a white background")


def test_lora_choice(tmp_path):
    (tmp_path / "loras" / "style").mkdir(parents=True)
    s = validate_generate("a red star", lora="style", erasure=NONE_CHOICE, lora_root=tmp_path / "loras")
    assert s.lora == str(tmp_path / "loras" / "style")
    assert s.describe() == "seed 0, DDIM, 25 steps, CFG 7.5, LoRA (style)"
    assert s.baseline().lora is None and s.baseline().describe() == "seed 0, DDIM, 25 steps, CFG 7.5"
    assert validate_generate("a red star", lora=NONE_CHOICE, lora_root=tmp_path / "loras").lora is None
    assert validate_generate("a red star").lora is None
    with pytest.raises(InputError, match=r"^LoRA '\.\./style' is not a folder name\.$"):
        validate_generate("a red star", lora="../style", lora_root=tmp_path / "loras")
    with pytest.raises(InputError, match=r"^LoRA 'gone' was not found in .*loras"):
        validate_generate("a red star", lora="gone", lora_root=tmp_path / "loras")
    with pytest.raises(InputError, match=r"^The LoRA folder .* does not exist"):
        validate_generate("a red star", lora="style", lora_root=tmp_path / "missing")
