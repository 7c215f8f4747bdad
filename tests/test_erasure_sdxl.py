"""Erasure on SDXL (issue 17 item 5): conditioning as diffusers encodes it, ESD / SalUn / AdvUnlearn (both
text encoders) end to end on the tiny SDXL pipeline, bit-identical load / unload, the CLI, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

import diffkit
from diffkit.cli import main
from diffkit.erasure import ErasureConfig, erase, make_accelerator, read_artifact, select_parameters
from diffkit.erasure.attack import AttackConfig, attack_success_rate
from diffkit.erasure.conditioning import XLConditioning, concat, unet_kwargs
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.erasure.probes import complete_from
from diffkit.erasure.sampling import cfg, ddim_scheduler
from diffkit.erasure.unlearndiffatk import UnlearnDiffAtkConfig
from diffkit.noise import add_noise, training_level

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
RETAIN = ["blue circle"]
JOBS = {  # a few steps, tiny sizes: each job takes about a second on one CPU thread
    "esd": dict(method="esd"),
    "salun": dict(method="salun", retain_prompts=RETAIN, num_images=2, batch_size=2),
    "advunlearn": dict(method="advunlearn", retain_prompts=RETAIN,
                       options={"attack": "sign", "attack_steps": 2, "warmup_steps": 0, "retain_batch": 1}),
}
TRAINS = {"esd": {"unet"}, "salun": {"unet"}, "advunlearn": {"text_encoder", "text_encoder_2"}}


def _job(name, **kw):
    return ErasureConfig(**{"concept": "red star", "steps": 2, "sample_steps": 2, "lr": 1e-3, **JOBS[name], **kw})


def _state(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def _latents(pipe):
    return pipe("red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def _diffusers_conditioning(pipe, prompts, size=64):
    """What StableDiffusionXLPipeline itself computes: encode_prompt, and _get_add_time_ids at ``size``."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return embeds, pooled, time_ids.repeat(len(prompts), 1)


@pytest.fixture(scope="module")
def jobs(tiny_paths, tmp_path_factory):
    """Each method's job, run once on a freshly loaded tiny SDXL: (result, base state, pipeline after the job)."""
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name in JOBS:
        pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sdxl"])
        pipe.set_progress_bar_config(disable=True)
        base = _state(pipe)
        out[name] = (erase(pipe, _job(name), root / name, progress=False), base, pipe)
    return out


# --- conditioning -----------------------------------------------------------------------------------------
def test_conditioning_is_what_diffusers_encode_prompt_computes(load_tiny):
    pipe = load_tiny("sdxl")
    prompts = ["a red star", "", "blue circle"]
    ctx = TrainingContext(pipe, _job("esd"), make_accelerator("no"))
    for original in (True, False):
        cond = ctx.embed(prompts, original=original)
        embeds, pooled, time_ids = _diffusers_conditioning(pipe, prompts)
        assert isinstance(cond, XLConditioning) and cond.embeds.shape == (3, 77, 64) and cond.pooled.shape == (3, 32)
        assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
        assert torch.equal(cond.time_ids, time_ids) and cond.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    # A job at another resolution is size-conditioned at that size, as the pipeline generating at it.
    big = TrainingContext(pipe, _job("esd", resolution=128), make_accelerator("no")).embed(["x"], original=True)
    assert torch.equal(big.time_ids, _diffusers_conditioning(pipe, ["x"], 128)[2])
    # The batch helpers act on the three parts together; unet_kwargs is the call diffusers makes.
    both = concat([cond[:1], cond[2:]])
    assert torch.equal(both.embeds, cond.embeds[[0, 2]]) and torch.equal(both.pooled, cond.pooled[[0, 2]])
    assert unet_kwargs(both)["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert unet_kwargs(embeds) == {"encoder_hidden_states": embeds}


def test_soft_prefix_enters_both_encoders(load_tiny):
    pipe = load_tiny("sdxl")
    enc = TrainingContext(pipe, _job("esd"), make_accelerator("no")).prompts
    assert enc.embedding_dim == 64 and enc.word_embeddings().shape == (608, 64)
    # The placeholder's own embeddings as the prefix: exactly the prompt with the placeholder token typed
    # twice ("a a red star"), through both encoders.
    with torch.no_grad():
        same = enc.encode(["red star"], enc.word_embeddings()[[enc.placeholder_id] * 2], cache=False)
        embeds, pooled, _ = _diffusers_conditioning(pipe, ["a a red star"])
        assert torch.equal(same.embeds, embeds) and torch.equal(same.pooled, pooled)
        # Each encoder gets its own half: changing the second half moves only text_encoder_2's part.
        prefix = enc.word_embeddings()[[enc.placeholder_id] * 2].clone()
        prefix[:, 32:] += 1.0
        moved = enc.encode(["red star"], prefix, cache=False)
        assert torch.equal(moved.embeds[..., :32], embeds[..., :32])
        assert not torch.allclose(moved.embeds[..., 32:], embeds[..., 32:]) and not torch.allclose(moved.pooled, pooled)


def test_frozen_original_is_the_base_sdxl_model(load_tiny):
    """ESD's frozen copy: with the trained tensors changed, predict(original=True) is still the base U-Net
    called as diffusers calls it; the trained model's prediction is not."""
    pipe, base = load_tiny("sdxl"), load_tiny("sdxl")
    ctx = TrainingContext(pipe, _job("esd"), make_accelerator("no"))
    params = select_parameters(ctx.components, "esd-x")
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    embeds, pooled, time_ids = _diffusers_conditioning(base, ["red star", ""])
    with torch.no_grad():
        want = base.unet(x, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        cond = ctx.embed(["red star", ""], original=True)
        assert torch.equal(ctx.predict(x, t, cond, original=True), want)
        assert not torch.allclose(ctx.predict(x, t, cond), want, atol=1e-4)


def test_text_encoder_preset_covers_both_encoders_less_what_sdxl_never_reads(load_tiny):
    pipe = load_tiny("sdxl")
    comps = {c: getattr(pipe, c) for c in COMPONENTS}
    te = select_parameters(comps, "text-encoder")
    by = {c: {q for q in te if q.startswith(c + ".")} for c in ("text_encoder", "text_encoder_2")}
    assert len(te) == len(by["text_encoder"]) + len(by["text_encoder_2"]) and all(by.values())
    assert not any("embeddings" in q for q in te)
    # encode_prompt reads text_encoder's penultimate hidden state: its last layer and final norm are dead.
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert not any(f"encoder.layers.{last}." in q or "final_layer_norm" in q for q in by["text_encoder"])
    assert {"text_encoder_2.text_model.final_layer_norm.weight", "text_encoder_2.text_projection.weight"} <= set(te)
    assert any(f"encoder.layers.{last}." in q for q in by["text_encoder_2"])


# --- the three methods end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(JOBS))
def test_job_trains_only_its_components_and_every_trained_tensor_moves(jobs, name):
    result, base, pipe = jobs[name]
    art = read_artifact(result.path)
    losses = result.sidecar["metrics"]["losses"]
    assert result.status == "trained" and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert {q.split(".", 1)[0] for q in art.names} == TRAINS[name]
    assert set(art.sidecar["base_model"]["components"]) == TRAINS[name]
    # Gradients reach every trained tensor through the SDXL conditioning: each one moved ...
    trained = {q: art.materialize(q, base[q]) for q in art.names}
    unmoved = [q for q, v in trained.items() if torch.equal(v, base[q])]
    assert unmoved == []
    # ... and the pipeline after the job holds exactly the artifact's values, every other tensor untouched.
    now = _state(pipe)
    assert all(torch.equal(now[q], trained[q] if q in trained else base[q]) for q in base)
    if name == "advunlearn":
        assert result.sidecar["metrics"]["attacked_steps"] == 2  # the prefix attack ran on both encoders
    if name == "salun":
        assert 0 < result.sidecar["metrics"]["salient_fraction"] <= 0.5 + 1e-6


@pytest.mark.parametrize("name", list(JOBS))
def test_artifact_loads_changes_the_output_and_unloads_bit_identically(jobs, load_tiny, name):
    result, base, _ = jobs[name]
    pipe = load_tiny("sdxl")
    before = _latents(pipe)
    side = pipe.load_erasure(result.path)
    assert side["method"] == name
    assert not torch.allclose(_latents(pipe), before, atol=1e-6)
    assert pipe.unload_erasure() == 1
    after = _state(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[q], base[q]) for q in base)
    assert torch.equal(_latents(pipe), before)


def test_fingerprint_covers_text_encoder_2(jobs, load_tiny):
    result, _, _ = jobs["advunlearn"]
    art = read_artifact(result.path)
    q = next(n for n in art.names if n.startswith("text_encoder_2."))
    pipe = load_tiny("sdxl")
    with torch.no_grad():
        pipe.text_encoder_2.get_parameter(q.split(".", 1)[1]).add_(1e-3)
    state = _state(pipe)
    with pytest.raises(ValueError, match=rf"tensor {q.replace('.', r'.')} differs from the one it was trained from"):
        pipe.load_erasure(result.path)
    assert pipe.loaded_erasures == [] and all(torch.equal(v, state[k]) for k, v in _state(pipe).items())
    # An SD 1.5 pipeline has no text_encoder_2 to patch.
    with pytest.raises(ValueError, match="changes a text_encoder_2, which this pipeline lacks"):
        load_tiny("sd15").load_erasure(result.path)


def test_export_writes_both_text_encoders(jobs, load_tiny, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffkit.erasure.export import export_erasure

    result, base, _ = jobs["advunlearn"]
    pipe = load_tiny("sdxl")
    out = export_erasure(pipe, result.path, tmp_path / "exported")
    art = read_artifact(result.path)
    for comp, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        state = {f"{comp}.{k}": v for k, v in cls.from_pretrained(out / comp).state_dict().items()}
        assert all(torch.equal(v, art.tensors[q] if q in art.names else base[q]) for q, v in state.items())
    assert all(torch.equal(v, base[k]) for k, v in _state(pipe).items())  # the pipeline is left as it was


def test_added_conditioning_carries_gradients(load_tiny, tmp_path):
    """The pooled text embedding and time_ids reach the U-Net: the layers that read only them train."""
    pipe = load_tiny("sdxl")
    base = _state(pipe)
    result = erase(pipe, _job("esd", steps=1, parameters=[r"unet\.add_embedding\..*"]), tmp_path / "a",
                   progress=False)
    art = read_artifact(result.path)
    assert len(art.names) == 4 and all(not torch.equal(art.tensors[q], base[q]) for q in art.names)


def test_preserve_gradient_runs_on_sdxl(load_tiny, tmp_path):
    pipe = load_tiny("sdxl")
    result = erase(pipe, _job("esd", steps=1, preserve_gradient=True, retain_prompts=RETAIN, num_images=1),
                   tmp_path / "p", progress=False)
    assert result.sidecar["metrics"]["surgery_tensor_steps"] == len(read_artifact(result.path).names)


def test_cli_erase_on_a_saved_sdxl_folder(tiny_paths, load_tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    flags = ["erase", "--model", str(tiny_paths["sdxl"]), "--out", str(out), "--method", "advunlearn",
             "--concept", "red star", "--retain", "blue circle", "--steps", "1", "--sample-steps", "2", "--quiet"]
    job = tmp_path / "job.yaml"
    job.write_text("options: {attack: sign, warmup_steps: 0, retain_batch: 1}\n")
    assert main([*flags, "--config", str(job)]) == 0
    assert capsys.readouterr().out.startswith(f"trained: advunlearn erasing ['red star'] -> {out} (1 steps")
    side = json.loads((out / "erasure.json").read_text())
    assert {q.split(".", 1)[0] for q in side["tensor_names"]} == {"text_encoder", "text_encoder_2"}
    pipe = load_tiny("sdxl")
    base = _state(pipe)
    pipe.load_erasure(out)
    pipe.unload_erasure()
    assert all(torch.equal(v, base[k]) for k, v in _state(pipe).items())
    # A method that does not run on SDXL is a clear command-line error.
    assert main(["erase", "--model", str(tiny_paths["sdxl"]), "--out", str(tmp_path / "d"), "--method", "doco",
                 "--concept", "red star", "--steps", "1", "--quiet"]) == 2
    assert "method 'doco' does not support SDXL pipelines (text_encoder_2) yet" in capsys.readouterr().err


# --- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job, message", [
    (dict(method="doco"), r"method 'doco' does not support SDXL pipelines \(text_encoder_2\) yet; on SDXL use one "
                          r"of \['advunlearn', 'esd', 'salun'\]"),
    (dict(method="esd", lora_rank=2, parametrization="lora"), "parametrization 'lora' does not support SDXL pipelines"),
])
def test_unsupported_jobs_are_refused_before_anything_changes(load_tiny, tmp_path, job, message):
    pipe = load_tiny("sdxl")
    base = _state(pipe)
    cfg = ErasureConfig(**{"concept": "red star", "steps": 1, "retain_prompts": RETAIN, **job})
    with pytest.raises(ValueError, match=message):
        erase(pipe, cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and all(torch.equal(v, base[k]) for k, v in _state(pipe).items())


@pytest.mark.parametrize("config, name", [(AttackConfig(steps=1), "the soft-prompt attack"),
                                          (UnlearnDiffAtkConfig(iterations=1, timesteps=1), "UnlearnDiffAtk")])
def test_attacks_refuse_sdxl(load_tiny, config, name):
    pipe = load_tiny("sdxl")
    with pytest.raises(ValueError, match=f"{name} supports SD 1.x/2.x pipelines .*is SDXL \\(text_encoder_2\\)"):
        attack_success_rate(pipe, ["red star"], lambda im: [False] * len(im), torch.zeros(1, 4, 8, 8), config)


def test_noise_search_probe_runs_on_sdxl(load_tiny):
    from diffkit.erasure.probes import NoiseSearchConfig, noise_search_probe

    report = noise_search_probe(load_tiny("sdxl"), ["red star"], lambda im: [False] * len(im),
                                config=NoiseSearchConfig(candidates=2, batch_size=2, num_inference_steps=2))
    assert report.hits == [False] and report.images.shape == (1, 3, 64, 64)


def test_completion_probe_conditions_sdxl_as_the_pipeline(load_tiny):
    """complete_from's one DDIM step (strength 0.5 of 2 steps), written out with diffusers' own conditioning."""
    pipe = load_tiny("sdxl")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = complete_from(pipe, x0, noise, 0.5, prompt="red star", num_inference_steps=2, guidance_scale=3.0,
                        output_type="latent")
    sched = ddim_scheduler(pipe.scheduler.config, 2)
    t = sched.timesteps[1]
    x = add_noise(x0, noise, training_level(sched.alphas_cumprod, t.reshape(1)))
    embeds, pooled, time_ids = _diffusers_conditioning(pipe, ["", "red star"])
    with torch.no_grad():
        pred_u, pred_c = pipe.unet(torch.cat([x, x]), torch.full((2,), int(t)), encoder_hidden_states=embeds,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.chunk(2)
    want = sched.step(cfg(pred_u, pred_c, 3.0), t, x).prev_sample
    assert torch.allclose(got, want, atol=1e-6)
