"""The demo's request logic (diffkit.app.logic, diffkit.app.ui.Handlers, diffkit.app.main) on the tiny model.

Each feature's result is compared with the same thing done directly on a pipeline, so the demo is shown to
pass the settings through unchanged and to restore the shared pipeline afterwards.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffkit.app import logic
from diffkit.app.main import (
    FALLBACK_MODEL,
    FALLBACK_NOTE,
    build_parser,
    load_model,
    main,
    prepare,
    reference_model_path,
)
from diffkit.app.settings import (
    DEFAULT_ERASE_SAMPLE_STEPS,
    DEFAULT_ERASE_STEPS,
    DEMO_ERASE_LR,
    DIFFUSERS_GUIDER,
    PREFERRED_ERASE_METHOD,
    SCHEDULERS,
    DeepCacheSettings,
    EditSettings,
    EraseSettings,
    GenerateSettings,
    GuidanceSettings,
    InputError,
    suggest_erase_prompts,
    validate_erase,
)
from diffkit.app.ui import GENERATE_FIELDS, Handlers, banner, failure_text
from diffkit.guidance import APG, CFG, CFGPlusPlus

STEPS = 4


@pytest.fixture
def model(load_tiny):
    return logic.DemoModel(load_tiny("sd15"), "tiny sd15")


def direct(pipe, prompt="a red star", seed=0, steps=STEPS, guidance=None, **kw):
    """The reference: a plain pipeline call, seeded like the demo seeds."""
    guidance = guidance or CFG(7.5)
    return pipe(prompt, num_inference_steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed),
                **kw).images[0]


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def settings(**kw) -> GenerateSettings:
    return GenerateSettings(**{"prompt": "a red star", "steps": STEPS, **kw})


# --- numbers -----------------------------------------------------------------------------------------


def test_speedup_and_psnr_numbers():
    assert logic.speedup(2.0, 0.5) == 4.0
    assert logic.speedup(0.3, 0.6) == 0.5
    with pytest.raises(ValueError, match="wall times must be positive, got 1.0 and 0.0"):
        logic.speedup(1.0, 0.0)
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    gray = Image.new("RGB", (8, 8), (10, 10, 10))
    # PSNR = 10 log10(1 / MSE) with pixels / 255: MSE = (10/255)^2, so PSNR = 20 log10(25.5).
    assert logic.psnr_db(black, gray) == pytest.approx(20 * math.log10(25.5), abs=1e-5)  # float32 pixels
    half = Image.fromarray(np.concatenate([np.zeros((4, 8, 3)), np.full((4, 8, 3), 51)]).astype(np.uint8))
    assert logic.psnr_db(black, half) == pytest.approx(10 * math.log10(1 / (0.5 * 0.2**2)), abs=1e-5)
    assert logic.psnr_db(gray, gray) == math.inf
    assert logic.format_psnr(math.inf) == "identical (inf dB)"
    assert logic.format_psnr(28.123) == "28.12 dB"


def test_comparison_text():
    b = logic.Generation(None, 1.5, settings())
    c = logic.Generation(None, 0.5, settings(deepcache=DeepCacheSettings(True, 3, 0, "uniform")))
    text = logic.format_comparison(logic.Comparison(b, c, 3.0, 31.416))
    assert text.splitlines()[0] == ("Baseline: **1.50 s** · Configured: **0.50 s** · Speedup: **3.00x** · "
                                    "PSNR vs baseline: **31.42 dB**")
    assert "Configured: seed 0, DDIM, 4 steps, CFG 7.5, DeepCache N=3 branch 0 uniform" in text


# --- guidance and schedulers --------------------------------------------------------------------------


def test_make_guidance_builds_the_library_objects():
    assert logic.make_guidance(GuidanceSettings("CFG", cfg_scale=5.0)) == CFG(5.0)
    assert logic.make_guidance(GuidanceSettings("APG", apg_scale=10, apg_eta=0.5, apg_norm_threshold=3,
                                                apg_momentum=-0.25)) == APG(10, 0.5, 3, -0.25)
    assert logic.make_guidance(GuidanceSettings("CFG++", cfgpp_scale=0.8)) == CFGPlusPlus(0.8)
    # A value the form did not catch: the library's message, prefixed with the method.
    with pytest.raises(InputError, match=r"^APG: momentum must be in \(-1, 1\), got 1\.0$"):
        logic.make_guidance(GuidanceSettings("APG", apg_momentum=1.0))


def test_schedulers_and_cfgpp_support(model):
    from diffkit.guidance.steps import STEP_RULES

    for label, (cls, _) in SCHEDULERS.items():
        sched = logic.make_scheduler(label, model.scheduler_config)
        assert type(sched).__name__ == cls
        assert sched.config.num_train_timesteps == model.scheduler_config["num_train_timesteps"]
    dpm = logic.make_scheduler("DPM++ 2M", model.scheduler_config).config
    assert (dpm.algorithm_type, dpm.solver_order, dpm.solver_type) == ("dpmsolver++", 2, "midpoint")
    for label in ("DDIM", "Euler", "Euler a", "DPM++ 2M"):
        logic.check_scheduler_supports("CFG++", logic.make_scheduler(label, model.scheduler_config))
    pndm = logic.make_scheduler("PNDM", model.scheduler_config)
    logic.check_scheduler_supports("CFG", pndm)  # only CFG++ needs a step rule
    with pytest.raises(InputError) as e:
        logic.check_scheduler_supports("CFG++", pndm)
    assert str(e.value).startswith("CFG++ cannot run with the PNDM scheduler. ")
    assert f"Supported schedulers: {', '.join(sorted(STEP_RULES))}" in str(e.value)


def test_missing_features_are_reported_not_raised():
    with pytest.raises(logic.FeatureUnavailable) as e:
        logic.pipeline_method(object(), "enable_deepcache", "DeepCache")
    assert str(e.value) == ("DeepCache is not available in this diffkit installation "
                            "(the pipeline has no enable_deepcache()).")
    with pytest.raises(logic.FeatureUnavailable, match=r"^PAG is not available in this diffkit installation "
                                                       r"\(diffkit\.guidance\.PAG is missing\)\.$"):
        logic.optional_attr("diffkit.guidance", "PAG", "PAG")
    with pytest.raises(logic.FeatureUnavailable, match=r"diffkit\.nonexistent\.x is missing"):
        logic.optional_attr("diffkit.nonexistent", "x", "X")
    report = logic.feature_report(object())
    assert report["DeepCache"] == ("DeepCache is not available in this diffkit installation "
                                   "(the pipeline has no enable_deepcache()).")
    assert report["APG"] is None and report["CFG++"] is None


# --- generate / compare -------------------------------------------------------------------------------


def test_generate_equals_a_direct_call_and_restores_the_scheduler(model, load_tiny):
    reference = load_tiny("sd15")
    scheduler = model.pipe.scheduler
    g = logic.generate(model, settings(seed=3, negative_prompt="blue"))
    assert same(g.image, direct(reference, seed=3, negative_prompt="blue")) and g.seconds > 0
    assert model.pipe.scheduler is scheduler
    euler = settings(scheduler="Euler a", guidance=GuidanceSettings("CFG++", cfgpp_scale=0.7))
    reference.scheduler = logic.make_scheduler("Euler a", model.scheduler_config)
    assert same(logic.generate(model, euler).image, direct(reference, guidance=CFGPlusPlus(0.7)))
    assert model.pipe.scheduler is scheduler
    with pytest.raises(InputError, match=r"^CFG\+\+ cannot run with the PNDM scheduler"):
        logic.generate(model, settings(scheduler="PNDM", guidance=GuidanceSettings("CFG++")))
    assert model.pipe.scheduler is scheduler  # restored after a refused request too


def test_generate_with_a_diffusers_guider_equals_a_direct_call(model, load_tiny, monkeypatch):
    from diffkit.guidance.diffusers_guiders import make_guider

    for name, scale in (("pag", 2.0), ("tcfg", 6.0)):
        g = logic.generate(model, settings(steps=4, guidance=GuidanceSettings(DIFFUSERS_GUIDER, guider=name,
                                                                              guider_scale=scale)))
        assert same(g.image, direct(load_tiny("sd15"), steps=4, guidance=make_guider(name, scale)))
        assert f"diffusers guider {name} {scale:g}" in g.settings.describe()
    # PAG's perturbation hooks are gone after the call: plain CFG is the plain pipeline again.
    assert same(logic.generate(model, settings(steps=4)).image, direct(load_tiny("sd15"), steps=4))
    # A guider whose own dependency is missing: the page names the pip extra.
    import diffkit.guidance.diffusers_guiders as dg

    monkeypatch.setattr(dg, "is_kornia_available", lambda: False)
    with pytest.raises(logic.FeatureUnavailable, match=r'^The fdg guider is not available in this diffkit '
                       r'installation \(FrequencyDecoupledGuidance needs the kornia package .*diffkit\[guiders\]'):
        logic.generate(model, settings(guidance=GuidanceSettings(DIFFUSERS_GUIDER, guider="fdg")))


def test_compare_apg_with_deepcache(model, load_tiny):
    s = settings(steps=6, guidance=GuidanceSettings("APG", cfg_scale=5.0, apg_scale=10.0),
                 deepcache=DeepCacheSettings(True, 3, 0, "uniform"))
    c = logic.compare(model, s, repeats=2)
    reference = load_tiny("sd15")
    assert same(c.baseline.image, direct(reference, steps=6, guidance=CFG(5.0)))
    reference.enable_deepcache(interval=3, branch=0, schedule="uniform")
    assert same(c.configured.image, direct(reference, steps=6, guidance=APG(10.0)))
    assert c.speedup == c.baseline.seconds / c.configured.seconds
    assert c.psnr == logic.psnr_db(c.baseline.image, c.configured.image) and 0 < c.psnr < math.inf
    assert model.pipe.deepcache is None  # detached after the call
    assert same(logic.generate(model, s.baseline()).image, c.baseline.image)
    plain = logic.compare(model, settings())
    assert plain.psnr == math.inf  # the configured pipeline is the baseline: identical images
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        logic.compare(model, settings(), repeats=0)
    with pytest.raises(InputError, match=r"^DeepCache: branch must be in \[0, "):
        logic.generate(model, settings(deepcache=DeepCacheSettings(True, 3, 40, "uniform")))
    assert model.pipe.deepcache is None


def test_pruning_uses_a_copy_and_matches_load_pruning(model, load_tiny, tmp_path):
    from diffkit.pruning import find_units, save_pruning

    kept = {u.name: list(range(max(1, u.size // 2))) for u in find_units(model.pipe.unet) if u.kind == "ffn"}
    save_pruning(tmp_path / "half-ffn", model.pipe.unet, kept, macs=False)
    before = sum(p.numel() for p in model.pipe.unet.parameters())
    g = logic.generate(model, settings(pruning=str(tmp_path / "half-ffn")))
    reference = load_tiny("sd15")
    reference.load_pruning(tmp_path / "half-ffn")
    assert same(g.image, direct(reference))
    assert sum(p.numel() for p in model.pipe.unet.parameters()) == before  # the shared U-Net is untouched
    assert same(logic.generate(model, settings()).image, direct(load_tiny("sd15")))
    pruned = model.pipeline_for(str(tmp_path / "half-ffn"))
    assert pruned is model.pipeline_for(str(tmp_path / "half-ffn"))  # cached
    assert sum(p.numel() for p in pruned.unet.parameters()) < before
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError, match=r"^The pruning spec '.*broken' could not be loaded: "):
        logic.generate(model, settings(pruning=str(tmp_path / "broken")))


def test_erase_then_generate_with_the_artifact(model, load_tiny, tmp_path):
    e = EraseSettings("red", "esd", "a red star", "a blue star", steps=2, lr=1e-3, sample_steps=3, preview_steps=3)
    r = logic.erase_concept(model, e, tmp_path)
    assert r.status == "trained" and r.artifact == str(tmp_path / logic.artifact_name(e))
    assert logic.artifact_name(e).startswith("esd-red-")
    assert model.pipe.loaded_erasures == []  # restored for everyone else
    plain = direct(load_tiny("sd15"), "a red star", steps=3)
    assert same(r.before_forget, plain) and not same(r.after_forget, plain)
    assert r.retain_psnr == logic.psnr_db(r.before_retain, r.after_retain)
    # The artifact in the Generate tab equals load_erasure on a fresh pipeline.
    g = logic.generate(model, settings(erasure=r.artifact))
    reference = load_tiny("sd15")
    reference.load_erasure(r.artifact)
    assert same(g.image, direct(reference))
    assert model.pipe.loaded_erasures == []
    # The same job again reuses its artifact and shows the same images.
    again = logic.erase_concept(model, e, tmp_path)
    assert again.status == "skipped" and same(again.after_forget, r.after_forget)
    assert model.pipe.loaded_erasures == []
    with pytest.raises(InputError, match=r"^The erasure artifact '.*missing' could not be loaded: "):
        logic.generate(model, settings(erasure=str(tmp_path / "missing")))
    with pytest.raises(InputError, match=r"^Erasure job: lr must be > 0, got -1\.0"):
        logic.erase_concept(model, EraseSettings("red", "esd", "a red star", "a blue star", lr=-1.0), tmp_path)


def test_edit_inverts_and_regenerates(model, load_tiny):
    source = direct(load_tiny("sd15"), "a red star", steps=STEPS)
    r = logic.edit(model, source.resize((32, 48)), EditSettings("a red star", "a blue star", 0.6, STEPS))
    assert r.original.size == (model.resolution, model.resolution) == r.edited.size == r.reconstruction.size
    reference = load_tiny("sd15")
    from diffusers import DDIMScheduler

    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    latents = reference.invert(r.original, "a red star", guidance=CFGPlusPlus(0.6), num_inference_steps=STEPS)
    for prompt, image in (("a red star", r.reconstruction), ("a blue star", r.edited)):
        expected = reference(prompt, latents=latents.clone(), guidance=CFGPlusPlus(0.6), num_inference_steps=STEPS)
        assert same(image, expected.images[0])
    assert r.reconstruction_psnr == logic.psnr_db(r.original, r.reconstruction)
    assert logic.fit_image(Image.new("RGB", (30, 10)), 8).size == (8, 8)


# --- the page's handlers ------------------------------------------------------------------------------


def form(**kw):
    values = dict(prompt="a red star", negative_prompt="", seed=0, steps=STEPS, scheduler="DDIM", method="CFG",
                  cfg_scale=7.5, apg_scale=15.0, apg_eta=0.0, apg_norm_threshold=15.0, apg_momentum=-0.5,
                  cfgpp_scale=0.6, deepcache=False, deepcache_interval=3, deepcache_branch=0,
                  deepcache_schedule="uniform", pruning="(none)", erasure="(none)", guider="pag", guider_scale=3.0,
                  lora="(none)")
    values.update(kw)
    return [values[k] for k in GENERATE_FIELDS]


def test_generate_with_a_lora_folder_equals_a_direct_call_and_unloads_it(model, load_tiny, tmp_path):
    pytest.importorskip("peft")
    from _lora import make_lora

    from diffkit.pruning import find_units, save_pruning

    style = make_lora(model.pipe.unet, tmp_path / "loras" / "style")
    before = weights(model.pipe)
    g = logic.generate(model, settings(lora=str(style), deepcache=DeepCacheSettings(True, 2)))
    reference = load_tiny("sd15")
    reference.load_lora_weights(style)
    reference.enable_deepcache(interval=2)
    assert same(g.image, direct(reference))
    assert not same(g.image, direct(load_tiny("sd15")))  # the LoRA changed the image
    assert len(model.pipe.features) == 0 and bit_equal(weights(model.pipe), before)  # unloaded, exactly
    assert same(logic.generate(model, settings()).image, direct(load_tiny("sd15")))

    h = Handlers(model, tmp_path / "pruning", tmp_path / "erasure", tmp_path / "loras")
    assert h.lora_choices() == ["(none)", "style"]
    _, image, text = h.generate(False, 1, *form(lora="style", deepcache=True, deepcache_interval=2))
    assert same(image, g.image) and text.endswith(", DeepCache N=2 branch 0 uniform, LoRA (style)")
    assert h.generate(False, 1, *form(lora="../style"))[2] == "⚠️ LoRA '../style' is not a folder name."
    (tmp_path / "loras" / "empty").mkdir()
    assert h.generate(False, 1, *form(lora="empty"))[2].startswith(f"⚠️ The LoRA {str(tmp_path / 'loras' / 'empty')!r} "
                                                                  f"could not be loaded: ")
    kept = {u.name: list(range(max(1, u.size // 2))) for u in find_units(model.pipe.unet) if u.kind == "ffn"}
    save_pruning(tmp_path / "pruning" / "half", model.pipe.unet, kept, macs=False)
    _, image, text = h.generate(False, 1, *form(lora="style", pruning="half"))
    assert image is None and "could not be loaded: lora cannot be combined with the attached pruning" in text
    assert len(model.pipe.features) == 0 and bit_equal(weights(model.pipe), before)


def test_handlers_turn_every_failure_into_a_message(model, monkeypatch, tmp_path):
    h = Handlers(model, tmp_path / "pruning", tmp_path / "erasure")
    assert h.generate(True, 1, *form(prompt="  ")) == (None, None, "⚠️ Please enter a prompt.")
    assert h.generate(True, 1, *form(steps=500)) == (None, None,
                                                     "⚠️ Steps must be a whole number between 1 and 100, got 500.")
    assert h.generate(True, 9, *form())[2] == "⚠️ Timing runs must be a whole number between 1 and 5, got 9."
    _, _, text = h.generate(True, 1, *form(method="CFG++", scheduler="PNDM"))
    assert text.startswith("⚠️ CFG++ cannot run with the PNDM scheduler. ") and "Supported schedulers:" in text
    _, _, text = h.generate(True, 1, *form(method="Diffusers guider", guider="sag"))
    assert text.startswith("⚠️ Diffusers guider must be one of pag, seg, skip-layer, ") and text.endswith(", got 'sag'.")
    _, _, text = h.generate(True, 1, *form(erasure="nothing-here"))
    assert text.startswith("⚠️ The Erasure artifact folder")
    baseline, image, text = h.generate(True, 1, *form())
    assert baseline is not None and image is not None and "Speedup: **" in text
    baseline, image, text = h.generate(False, 1, *form())
    assert baseline is None and image is not None and text.endswith("s** — seed 0, DDIM, 4 steps, CFG 7.5")
    assert h.edit(None, "a", "b", 0.6, 4) == (None, None, None, "⚠️ Please upload an image to edit.")
    assert h.erase("", "esd", "f", "r", 2, None, 3, 0)[-1] == "⚠️ Please enter a concept to erase."
    assert Handlers(model).erase("red", "esd", "f", "r", 2, None, 3, 0)[-1] == \
        "⚠️ No erasure folder is configured; start the app with --erasure-dir DIR."

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(logic, "compare", boom)
    assert h.generate(True, 1, *form()) == (None, None, failure_text(RuntimeError("boom")))
    assert failure_text(RuntimeError("boom")) == ("❌ Something went wrong: RuntimeError: boom "
                                                  "(the server log has the details).")
    (tmp_path / "erasure" / "esd-red").mkdir(parents=True)
    assert h.artifact_choices() == (["(none)"], ["(none)", "esd-red"])


def test_two_users_at_once_get_their_own_results(model):
    h = Handlers(model)
    expected = {seed: h.generate(False, 1, *form(seed=seed, method="APG" if seed else "CFG",
                                                 deepcache=bool(seed)))[1] for seed in (0, 1)}
    results, barrier = {}, threading.Barrier(2)

    def user(seed):
        barrier.wait()
        results[seed] = h.generate(False, 1, *form(seed=seed, method="APG" if seed else "CFG", deepcache=bool(seed)))

    threads = [threading.Thread(target=user, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (0, 1):
        assert same(results[seed][1], expected[seed])
    assert not same(expected[0], expected[1])
    assert model.pipe.deepcache is None


# --- long jobs, failures --------------------------------------------------------------------------------


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the U-Net and text encoder, cloned (for bit-equality checks)."""
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lock_is_free(model) -> bool:
    """Whether another thread can take the model's lock at once (an RLock is re-entrant in its owner)."""
    got = []

    def probe():
        ok = model.lock.acquire(blocking=False)
        got.append(ok)
        if ok:
            model.lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got == [True]


def test_generation_does_not_wait_for_an_erase_job(model, load_tiny, tmp_path, monkeypatch):
    """An erase job runs in a thread; meanwhile a generation finishes in about one generation's time and
    equals the untouched model's image, and the shared weights never change."""
    real_erase = logic.erasure_trainer()
    training, release = threading.Event(), threading.Event()

    def erase_then_hold(pipe, config, out, **kw):
        training.set()
        result = real_erase(pipe, config, out, **kw)  # real training on the job's private copy
        assert release.wait(60)  # and keep the job running until the generation below is done
        return result

    monkeypatch.setattr(logic, "erasure_trainer", lambda: erase_then_hold)
    shared = weights(model.pipe)
    expected = direct(load_tiny("sd15"))
    solo = min(logic.generate(model, settings()).seconds for _ in range(2))
    job = EraseSettings("red", "esd", "a red star", "a blue star", steps=30, lr=1e-3, sample_steps=3,
                        preview_steps=3)
    results = {}
    worker = threading.Thread(target=lambda: results.update(r=logic.erase_concept(model, job, tmp_path)))
    worker.start()
    try:
        assert training.wait(60)
        start = time.perf_counter()
        g = logic.generate(model, settings())
        seconds = time.perf_counter() - start
        assert worker.is_alive()  # the job had not finished: the generation did not wait for it
        assert seconds < 5 * solo + 1.0, (seconds, solo)
        assert same(g.image, expected) and bit_equal(weights(model.pipe), shared)
        with pytest.raises(InputError, match=r"^Another erasure job is running on this server; try again when "
                                             r"it has finished\.$"):
            logic.erase_concept(model, job, tmp_path / "second")
    finally:
        release.set()
        worker.join(120)
    r = results["r"]
    assert r.status == "trained" and not same(r.after_forget, r.before_forget)
    assert bit_equal(weights(model.pipe), shared) and model.pipe.loaded_erasures == []
    assert same(logic.generate(model, settings()).image, expected)


def test_building_a_pruned_copy_does_not_block_generation(model, load_tiny, tmp_path, monkeypatch):
    loading, release = threading.Event(), threading.Event()

    def slow_load_pruning(pipe, spec):  # stands in for a long spec load on the copy
        loading.set()
        assert release.wait(60)

    monkeypatch.setattr(type(model.pipe), "load_pruning", slow_load_pruning)
    (tmp_path / "spec").mkdir()
    worker = threading.Thread(target=logic.generate, args=(model, settings(pruning=str(tmp_path / "spec"))))
    worker.start()
    try:
        assert loading.wait(60)
        start = time.perf_counter()
        g = logic.generate(model, settings())
        assert time.perf_counter() - start < 10 and worker.is_alive()
        assert same(g.image, direct(load_tiny("sd15")))
    finally:
        release.set()
        worker.join(60)


def test_a_corrupt_artifact_leaves_the_pipeline_as_before(model, load_tiny, tmp_path, monkeypatch):
    """A truncated tensor file, a load that fails half-way and a crash in the middle of a request all leave
    the shared weights bit-identical, the scheduler and hooks restored and the lock free; the demo serves on."""
    from diffkit.erasure.artifact import TENSORS_FILE, Artifact

    e = EraseSettings("red", "esd", "a red star", "a blue star", steps=2, lr=1e-3, sample_steps=3, preview_steps=3)
    good = logic.erase_concept(model, e, tmp_path / "erasure").artifact
    root = tmp_path / "erasure"
    h = Handlers(model, erasure_dir=root)
    shutil.copytree(good, root / "truncated")
    tensors = root / "truncated" / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    shared, scheduler = weights(model.pipe), model.pipe.scheduler
    expected = direct(load_tiny("sd15"))

    def check_restored():
        assert bit_equal(weights(model.pipe), shared)
        assert model.pipe.loaded_erasures == [] and model.pipe.deepcache is None
        assert model.pipe.scheduler is scheduler and lock_is_free(model)

    _, image, text = h.generate(False, 1, *form(erasure="truncated"))
    assert image is None and text.startswith(f"⚠️ The erasure artifact {str(root / 'truncated')!r} could not be "
                                             f"loaded: ")
    check_restored()

    # A load that fails half-way (library load is all-or-nothing: nothing stays half-applied).
    real, calls = Artifact.materialize, []

    def fail_second(self, name, base):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("disk vanished")
        return real(self, name, base)

    with monkeypatch.context() as m:
        m.setattr(Artifact, "materialize", fail_second)
        _, image, text = h.generate(False, 1, *form(erasure=Path(good).name, deepcache=True, scheduler="Euler"))
    assert len(calls) == 2 and image is None
    assert text == f"⚠️ The erasure artifact {good!r} could not be loaded: disk vanished"
    check_restored()

    # A crash inside the pipeline call, with an erasure, DeepCache and another scheduler applied.
    def crash(*a, **k):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(model.pipe.unet.conv_out, "forward", crash)
        _, image, text = h.generate(False, 1, *form(erasure=Path(good).name, deepcache=True, scheduler="Euler"))
    assert (image, text) == (None, failure_text(RuntimeError("out of memory")))
    check_restored()

    # Everyone is still served: the plain model, and the intact artifact as load_erasure gives it.
    assert same(logic.generate(model, settings()).image, expected)
    reference = load_tiny("sd15")
    reference.load_erasure(good)
    assert same(h.generate(False, 1, *form(erasure=Path(good).name))[1], direct(reference))
    check_restored()


@pytest.fixture(scope="module")
def reference_model():
    path = reference_model_path()
    if path is None:
        pytest.skip("the shipped reference model is not installed")
    return load_model(None)


def test_erase_tab_defaults_finish_in_30s_and_erase_the_concept(reference_model, tmp_path):
    """The Erase tab's defaults (ESD-x, DEFAULT_ERASE_STEPS at DEMO_ERASE_LR) on the reference model: the
    whole request (previews included) within 30 s on this 2-core CPU; the oracle sees the concept gone from
    the forget prompt (over 8 seeds) and the retain prompt's concept kept."""
    from diffkit.zoo import load_reference_classifier

    model = reference_model
    forget, retain = suggest_erase_prompts("red")
    methods = logic.erasure_methods()
    assert PREFERRED_ERASE_METHOD == "esd" and "esd" in methods
    e = validate_erase("red", PREFERRED_ERASE_METHOD, forget, retain, methods=methods)
    assert (e.steps, e.lr, e.sample_steps) == (DEFAULT_ERASE_STEPS, None, DEFAULT_ERASE_SAMPLE_STEPS) == (40, None, 20)
    config = logic.erasure_config(e)
    assert (config.lr, config.parameters, config.concept) == (DEMO_ERASE_LR["esd"], "esd-x", ("red", forget))
    start = time.perf_counter()
    r = logic.erase_concept(model, e, tmp_path)
    seconds = time.perf_counter() - start
    print(f"Erase tab defaults: {seconds:.1f} s in all, {r.seconds:.1f} s training")
    assert r.status == "trained" and seconds < 30, seconds
    oracle = load_reference_classifier()

    def colors(prompt, erasure):
        images = [logic.generate(model, GenerateSettings(prompt, seed=s, erasure=erasure)).image for s in range(8)]
        return oracle.classify(images).labels["color"]

    assert oracle.classify([r.before_forget, r.after_forget, r.before_retain, r.after_retain]).labels["color"][0] \
        == "red"
    before, after, kept = colors(forget, None), colors(forget, r.artifact), colors(retain, r.artifact)
    print(f"oracle: red in {before.count('red')}/8 forget images before, {after.count('red')}/8 after; "
          f"green in {kept.count('green')}/8 retain images after")
    assert before.count("red") == 8 and after.count("red") <= 2 and kept.count("green") >= 7, (before, after, kept)


# --- command line -------------------------------------------------------------------------------------


def test_command_line_defaults_and_errors(capsys, tiny_paths, monkeypatch):
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.model, args.device, args.dtype) == (
        "127.0.0.1", 7860, False, None, "cpu", "float32")
    assert main(["--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == ("app.py: error: unknown device 'tpu'; use one of cpu, cuda, mps "
                                               "(optionally cuda:N)")
    assert main(["--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "app.py: error: --port must be in [0, 65535], got 70000"
    assert main(["--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err.strip() == "app.py: error: model path '/no/such/model' does not exist"
    demo, launch = prepare(["--model", str(tiny_paths["sd15"]), "--port", "0", "--no-warmup"])
    assert launch["server_name"] == "127.0.0.1" and launch["share"] is False and launch["server_port"] == 0
    monkeypatch.setattr("diffkit.app.main.reference_model_path", lambda: tiny_paths["sd2"])
    reference = load_model(None)
    assert (reference.name, reference.note) == ("reference model (diffkit.zoo)", "")
    assert reference.pipe.scheduler.config.prediction_type == "v_prediction"  # it loaded that folder
    monkeypatch.setattr("diffkit.app.main.reference_model_path", lambda: None)
    fallback = load_model(None)
    assert (fallback.name, fallback.note) == (FALLBACK_MODEL, FALLBACK_NOTE)
    assert "⚠️ " + FALLBACK_NOTE in banner(fallback)


def test_reference_model_path_is_the_zoo_s():
    from diffkit.zoo import reference_path

    try:
        expected = reference_path()
    except FileNotFoundError:  # not installed: the demo falls back to the tiny model (tested above)
        expected = None
    assert reference_model_path() == expected
