"""diffusers' guiders (``diffusers.guiders``) on diffkit's pipelines, against hand-written sampling loops.

Each hand loop runs the U-Net on ``[uncond, cond]`` itself, feeds the guider its predictions step by step
(``set_state`` / ``prepare_inputs`` / ``forward``, the modular pipelines' protocol) and takes the scheduler's
step. Perturbed predictions are computed by hand, independently of diffusers' hooks: PAG's self-attention
replaced by the identity map (the attention returns its values), SEG's query replaced by its mean over the
tokens (the blur of ``seg_blur_sigma`` below diffusers' infinity threshold), SkipLayer's and AutoGuidance's
transformer blocks replaced by the identity.
"""

from __future__ import annotations

import contextlib
import copy
import math

import diffusers
import pytest
import torch
import torch.nn.functional as F
from _controlnet import controlnet_pipeline
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    AdaptiveProjectedMixGuidance,
    AutoGuidance,
    BaseGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    LTX2Guidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.hooks import LayerSkipConfig
from diffusers.utils import is_kornia_available

import diffkit
from diffkit.cache import apply_deepcache, remove_deepcache
from diffkit.guidance.diffusers_guiders import DiffusersGuidance, make_guider, preset_layers, unet_layers

STEPS = 4
PROMPT = "a red star"
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}


@pytest.fixture(scope="module")
def pipes(tiny_paths):
    """Per family: a diffkit pipeline to call and a separate one for the hand loops (never hooked)."""
    cache = {}

    def get(family):
        if family not in cache:
            pair = []
            for _ in range(2):
                p = diffkit.DiffusionPipeline.from_pretrained(tiny_paths[family])
                p.set_progress_bar_config(disable=True)
                pair.append(p)
            cache[family] = (*pair, copy.deepcopy(dict(pair[0].scheduler.config)))
        pipe, ref, config = cache[family]
        return pipe, ref, config

    return get


# ---------------------------------------------------------------------------------------------------
# Perturbations by hand
# ---------------------------------------------------------------------------------------------------


class IdentityAttention:
    """Self-attention with the attention map replaced by the identity: out = to_out(to_v(x)) (PAG)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


class MeanQueryAttention:
    """Self-attention whose queries are all their mean over the (square) token grid (SEG, infinite blur)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        sq = math.isqrt(n) ** 2
        q = torch.cat([q[:, :sq].mean(dim=1, keepdim=True).expand(-1, sq, -1), q[:, sq:]], dim=1)
        k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
        h = attn.heads
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def mid_blocks(unet):
    return list(unet.mid_block.attentions[0].transformer_blocks)


def first_up_blocks(unet):
    up = next(b for b in unet.up_blocks if hasattr(b, "attentions"))
    return list(up.attentions[0].transformer_blocks)


@contextlib.contextmanager
def processors(blocks, make):
    saved = [b.attn1.processor for b in blocks]
    for b in blocks:
        b.attn1.processor = make()
    try:
        yield
    finally:
        for b, p in zip(blocks, saved):
            b.attn1.processor = p


@contextlib.contextmanager
def identity_blocks(blocks):
    for b in blocks:
        b.forward = lambda hidden_states, *a, **k: hidden_states
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


HAND = {  # guider kind -> (prediction it perturbs, rows, the perturbation by hand on the U-Net)
    "pag": ("pred_cond_skip", "cond", lambda u: processors(mid_blocks(u), IdentityAttention)),
    "seg": ("pred_cond_seg", "cond", lambda u: processors(mid_blocks(u), MeanQueryAttention)),
    "skip-layer": ("pred_cond_skip", "cond", lambda u: identity_blocks(mid_blocks(u) + first_up_blocks(u))),
    "auto": ("pred_uncond", "uncond", lambda u: identity_blocks(mid_blocks(u))),
}


def conditioning(pipe):
    """The text conditioning of the batch [uncond, cond] (and SDXL's added_cond_kwargs), as diffusers forms it."""
    if hasattr(pipe, "text_encoder_2"):
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True)
        ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=pe.dtype,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return torch.cat([npe, pe]), {"text_embeds": torch.cat([nppe, ppe]), "time_ids": torch.cat([ids, ids])}
    emb, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    return torch.cat([neg, emb]), None


def rows(added, lo, hi):
    return None if added is None else {k: v[lo:hi] for k, v in added.items()}


def by_hand(ref, config, guider, scheduler, noise, kind=None, image=None, strength=None, deepcache=None):
    """The hand-written loop: U-Net on [uncond, cond], perturbed rows by hand, guider.set_state/forward, step."""
    sched = SCHEDULERS[scheduler].from_config(config)
    sched.set_timesteps(STEPS)
    timesteps = sched.timesteps
    cond, added = conditioning(ref)
    if image is None:
        x = noise * sched.init_noise_sigma
    else:
        t_start = max(STEPS - min(int(STEPS * strength), STEPS), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(image, noise, timesteps[:1])
    if deepcache is not None:
        apply_deepcache(ref.unet, interval=deepcache, scheduler=sched)
    b = x.shape[0]
    try:
        for i, t in enumerate(timesteps):
            guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=t)
            wanted = [getattr(s, BaseGuidance._identifier_key) for s in guider.prepare_inputs({})]
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            out = ref.unet(inp, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
            u, c = out.chunk(2)
            preds = dict(pred_cond=c, pred_uncond=u)
            if kind is not None:
                name, which, perturbation = HAND[kind] if isinstance(kind, str) else kind
                if name in wanted:
                    lo, hi = (b, 2 * b) if which == "cond" else (0, b)
                    with perturbation(ref.unet):
                        preds[name] = ref.unet(inp[lo:hi], t, encoder_hidden_states=cond[lo:hi],
                                               added_cond_kwargs=rows(added, lo, hi)).sample
            if isinstance(guider, MagnitudeAwareGuidance):  # its norms need 3-D tensors: (B, C, H*W)
                x = sched.step(guider.forward(**{k: v.flatten(2) for k, v in preds.items()}).pred.reshape(x.shape),
                               t, x).prev_sample
            else:
                x = sched.step(guider.forward(**preds).pred, t, x).prev_sample
    finally:
        if deepcache is not None:
            remove_deepcache(ref.unet)
    return x


def noise_for(seed=0):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def call(pipe, config, guidance, scheduler, noise, **kw):
    pipe.scheduler = SCHEDULERS[scheduler].from_config(config)
    return pipe(PROMPT, latents=noise, num_inference_steps=STEPS, output_type="latent", guidance=guidance,
                **kw).images


def no_hooks_left(unet):
    return all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in unet.modules())


# ---------------------------------------------------------------------------------------------------
# Every guider on every family, DDIM and Euler
# ---------------------------------------------------------------------------------------------------

GUIDERS = {  # name -> (factory of a fresh guider, kind of perturbation or None)
    "cfg-rescale-start": (lambda: ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.5, start=0.25), None),
    "cfg-disabled": (lambda: ClassifierFreeGuidance(guidance_scale=6.0, enabled=False), None),
    "apg": (lambda: AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                              adaptive_projected_guidance_rescale=2.0), None),
    "apg-mix": (lambda: AdaptiveProjectedMixGuidance(guidance_scale=4.0, adaptive_projected_guidance_scale=8.0,
                                                     adaptive_projected_guidance_start_step=1,
                                                     adaptive_projected_guidance_rescale=2.0), None),
    "cfg-zero-star": (lambda: ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=1), None),
    "tcfg": (lambda: TangentialClassifierFreeGuidance(guidance_scale=6.0), None),
    "mambo": (lambda: MagnitudeAwareGuidance(guidance_scale=8.0, alpha=2.0), None),
    "pag": (lambda: PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0,
                                               perturbed_guidance_layers=[0], perturbed_guidance_start=0.0,
                                               perturbed_guidance_stop=1.0), "pag"),
    "pag-without-cfg": (lambda: PerturbedAttentionGuidance(guidance_scale=1.0, perturbed_guidance_scale=3.0,
                                                           perturbed_guidance_layers=[0], perturbed_guidance_start=0.0,
                                                           perturbed_guidance_stop=1.0), "pag"),
    "seg": (lambda: SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_scale=3.0, seg_blur_sigma=1.0,
                                           seg_guidance_layers=[0]), "seg"),
    "skip-layer": (lambda: SkipLayerGuidance(guidance_scale=5.0, skip_layer_guidance_scale=2.0,
                                             skip_layer_guidance_layers=[0], skip_layer_guidance_start=0.0,
                                             skip_layer_guidance_stop=1.0), "skip-layer"),
    "auto": (lambda: AutoGuidance(guidance_scale=5.0, auto_guidance_layers=[0], dropout=1.0), "auto"),
}
if is_kornia_available():  # the dev extra installs kornia
    from diffusers.guiders import FrequencyDecoupledGuidance

    GUIDERS["fdg"] = (lambda: FrequencyDecoupledGuidance(guidance_scales=[8.0, 4.0]), None)

CASES = [("sd15", "ddim"), ("sd15", "euler"), ("sd2", "ddim"), ("sd2", "euler"), ("sdxl", "ddim"), ("sdxl", "euler")]


def assert_matches(got, expected):
    assert got.shape == expected.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, scheduler", CASES, ids=[f"{f}-{s}" for f, s in CASES])
@pytest.mark.parametrize("name", list(GUIDERS))
def test_guider_equals_the_hand_loop(pipes, name, family, scheduler):
    pipe, ref, config = pipes(family)
    make, kind = GUIDERS[name]
    noise = noise_for(1)
    got = call(pipe, config, make(), scheduler, noise)
    expected = by_hand(ref, config, make(), scheduler, noise, kind=kind)
    assert_matches(got, expected)
    assert no_hooks_left(pipe.unet) and len(pipe.features) == 0 and "step" not in pipe.scheduler.__dict__
    if kind is not None:  # the perturbation matters: the same loop without it differs
        name_, which, _ = HAND[kind]
        unperturbed = by_hand(ref, config, make(), scheduler, noise,
                              kind=(name_, which, lambda u: contextlib.nullcontext()))
        assert (got - unperturbed).abs().max() > 1e-4


def test_cfg_guider_equals_diffusers_guidance_scale(pipes):
    """ClassifierFreeGuidance(s) gives the latents of diffusers' own guidance_scale=s, bit for bit."""
    pipe, _, config = pipes("sd15")
    noise = noise_for(2)
    pipe.scheduler = SCHEDULERS["ddim"].from_config(config)
    plain = pipe(PROMPT, latents=noise, num_inference_steps=STEPS, output_type="latent", guidance_scale=7.5).images
    assert torch.equal(call(pipe, config, ClassifierFreeGuidance(guidance_scale=7.5), "ddim", noise), plain)


def test_img2img(pipes):
    pipe, ref, config = pipes("sd15")
    img2img = diffkit.DiffusionPipeline.from_pipe(diffusers.StableDiffusionImg2ImgPipeline(**pipe.components))
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = SCHEDULERS["ddim"].from_config(config)
    image = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))  # latents: no VAE encode
    make, kind = GUIDERS["pag"]
    got = img2img(PROMPT, image=image, strength=0.75, num_inference_steps=STEPS, output_type="latent",
                  guidance=make(), generator=torch.Generator().manual_seed(6)).images
    expected = by_hand(ref, config, make(), "ddim", noise_for(6), kind=kind, image=image, strength=0.75)
    assert_matches(got, expected)


# ---------------------------------------------------------------------------------------------------
# Layers: presets, explicit names, the guider's own config
# ---------------------------------------------------------------------------------------------------


def test_presets_on_the_tiny_models(pipes):
    sd = pipes("sd15")[0].unet
    assert preset_layers(sd, "PerturbedAttentionGuidance") == ["mid_block.attentions.0.transformer_blocks.0"]
    assert preset_layers(sd, "SkipLayerGuidance") == ["mid_block.attentions.0.transformer_blocks.0",
                                                      "up_blocks.1.attentions.0.transformer_blocks.0"]
    xl = pipes("sdxl")[0].unet
    assert preset_layers(xl, "SmoothedEnergyGuidance") == [f"mid_block.attentions.0.transformer_blocks.{i}"
                                                           for i in range(2)]
    assert "down_blocks.0.attentions.1.transformer_blocks.0" in unet_layers(sd)


def test_explicit_layers_and_explicit_config_pick_the_same_layer(pipes):
    pipe, ref, config = pipes("sd15")
    noise = noise_for(3)
    where = "up_blocks.2.attentions.1.transformer_blocks.0"

    def pag(**kw):
        return PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0,
                                          perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0, **kw)

    by_name = call(pipe, config, DiffusersGuidance(pag(perturbed_guidance_layers=[0]), layers=[where + ".attn1"]),
                   "ddim", noise)
    by_config = call(pipe, config, pag(perturbed_guidance_config=LayerSkipConfig(
        indices=[0], fqn=where.rsplit(".", 1)[0], skip_attention=False, skip_attention_scores=True, skip_ff=False)),
        "ddim", noise)
    assert torch.equal(by_name, by_config)
    here = ("pred_cond_skip", "cond", lambda u: processors([u.get_submodule(where)], IdentityAttention))
    expected = by_hand(ref, config, pag(perturbed_guidance_layers=[0]), "ddim", noise, kind=here)
    assert_matches(by_name, expected)


# ---------------------------------------------------------------------------------------------------
# Composition with the other features
# ---------------------------------------------------------------------------------------------------


def test_diffusers_apg_with_deepcache_equals_the_hand_loop_with_deepcache(pipes):
    pipe, ref, config = pipes("sd15")
    noise = noise_for(4)
    make = GUIDERS["apg"][0]
    pipe.enable_deepcache(interval=2)
    try:
        got = call(pipe, config, make(), "ddim", noise)
        assert pipe.deepcache_stats()["cached"] == STEPS // 2
    finally:
        pipe.disable_deepcache()
    expected = by_hand(ref, config, make(), "ddim", noise, deepcache=2)
    assert torch.equal(got, expected)
    assert not torch.equal(got, by_hand(ref, config, make(), "ddim", noise))


def test_pag_with_deepcache(pipes):
    """Interval 1 changes nothing; with interval 2 the perturbed rows are cached like the others (one U-Net
    evaluation per step). PAG starts at step 1 (diffusers' strict start bound), so step 1's batch grows and
    DeepCache runs it in full: of the cached steps 1 and 3 only 3 is cached. Disabling restores the latents."""
    pipe, _, config = pipes("sd15")
    noise = noise_for(5)
    make = GUIDERS["pag"][0]
    plain = call(pipe, config, make(), "ddim", noise)
    pipe.enable_deepcache(interval=1)
    try:
        torch.testing.assert_close(call(pipe, config, make(), "ddim", noise), plain, rtol=1e-6, atol=1e-6)
        pipe.enable_deepcache(interval=2)
        cached = call(pipe, config, make(), "ddim", noise)
        assert [kind for *_, kind in pipe.deepcache_stats()["evaluations"]] == ["full", "full", "full", "cached"]
        assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    finally:
        pipe.disable_deepcache()
    assert torch.equal(call(pipe, config, make(), "ddim", noise), plain)
    assert no_hooks_left(pipe.unet)


def test_pag_on_a_pruned_unet_equals_pag_on_the_hand_slimmed_unet(pipes, tmp_path):
    from diffkit.pruning import find_units, prune_unet, save_pruning

    pipe, ref, config = pipes("sd15")
    kept = {u.name: list(range(0, u.size, 2)) for u in find_units(pipe.unet)}
    save_pruning(tmp_path / "spec", pipe.unet, kept, macs=False)
    noise = noise_for(6)
    make = GUIDERS["pag"][0]
    pipe.load_pruning(tmp_path / "spec")
    try:
        got = call(pipe, config, make(), "ddim", noise)
    finally:
        pipe.unload_pruning()
    slim = copy.deepcopy(ref.unet)
    prune_unet(slim, find_units(slim), kept)
    full, ref.unet = ref.unet, slim
    try:
        expected = by_hand(ref, config, make(), "ddim", noise, kind="pag")
    finally:
        ref.unet = full
    assert_matches(got, expected)


def test_callbacks_read_the_guiders_scale(pipes):
    pipe, _, config = pipes("sd15")
    seen = []

    def look(p, i, t, kw):
        seen.append(([f.name for f in p.features], p.guidance_scale))
        return kw

    call(pipe, config, GUIDERS["pag"][0](), "ddim", noise_for(0), callback_on_step_end=look)
    assert seen == [(["guidance"], 5.0)] * STEPS


def test_controlnet_pipeline_with_pag(pipes):
    pipe, _, config = pipes("sd15")
    cn, net = controlnet_pipeline(pipe)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    make = GUIDERS["pag"][0]
    pag = call(cn, config, make(), "ddim", noise_for(0), image=image)
    cfg = call(cn, config, ClassifierFreeGuidance(guidance_scale=5.0), "ddim", noise_for(0), image=image)
    assert torch.isfinite(pag).all() and not torch.allclose(pag, cfg)
    assert no_hooks_left(cn.unet)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_unknown_layer_names_list_the_valid_ones(pipes):
    pipe, _, config = pipes("sd15")
    pag = PerturbedAttentionGuidance(perturbed_guidance_layers=[0])
    with pytest.raises(ValueError, match=r"unknown U-Net layer 'mid_block.nope'; valid layers \(transformer blocks, "
                                         r"or their '.attn1' self-attention\): down_blocks.0.attentions.0.transformer_"
                                         r"blocks.0, .*mid_block.attentions.0.transformer_blocks.0"):
        call(pipe, config, DiffusersGuidance(pag, layers=["mid_block.nope"]), "ddim", noise_for(0))
    bad = PerturbedAttentionGuidance(perturbed_guidance_config=LayerSkipConfig(indices=[3], fqn="mid_block.attentions.0"
                                                                                               ".transformer_blocks"))
    with pytest.raises(ValueError, match="unknown U-Net layer 'mid_block.attentions.0.transformer_blocks.3'"):
        call(pipe, config, bad, "ddim", noise_for(0))
    assert no_hooks_left(pipe.unet) and len(pipe.features) == 0


def test_unsupported_and_impossible_guiders(pipes):
    pipe, _, config = pipes("sd15")
    with pytest.raises(ValueError, match="LTX2Guidance is not supported on SD/SDXL pipelines: it guides LTX-2's "
                                         "video and audio streams"):
        call(pipe, config, LTX2Guidance(guidance_scale=3.0), "ddim", noise_for(0))

    class NeedsMore(ClassifierFreeGuidance):
        _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_depth"]

    class Custom(BaseGuidance):
        _input_predictions = ["pred_cond", "pred_cond_depth"]

    with pytest.raises(ValueError, match="Custom asks for the predictions pred_cond_depth, which a classic SD/SDXL "
                                         "pipeline cannot provide"):
        DiffusersGuidance(Custom())
    assert DiffusersGuidance(NeedsMore()).scale == 7.5  # a CFG subclass combines as CFG does
    with pytest.raises(ValueError, match="layers= is for the guiders that perturb U-Net layers"):
        DiffusersGuidance(ClassifierFreeGuidance(), layers=["mid_block.attentions.0.transformer_blocks.0"])
    with pytest.raises(TypeError, match=r"guidance must be a diffkit.guidance object \(CFG, APG, CFGPlusPlus, "
                                        r"DiffusersGuidance\) or a diffusers.guiders guider \(ClassifierFreeGuidance"):
        call(pipe, config, "pag", "ddim", noise_for(0))


def test_pag_needs_the_sdpa_processor(pipes):
    from diffusers.models.attention_processor import AttnProcessor

    pipe, _, config = pipes("sd15")
    saved = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(ValueError, match="PerturbedAttentionGuidance perturbs self-attention with diffusers' "
                                             "layer-skip hooks, which need the SDPA processor AttnProcessor2_0; "
                                             "mid_block.attentions.0.transformer_blocks.0.attn1 uses AttnProcessor"):
            call(pipe, config, GUIDERS["pag"][0](), "ddim", noise_for(0))
    finally:
        pipe.unet.set_attn_processor(saved)
    assert no_hooks_left(pipe.unet) and len(pipe.features) == 0


def test_guidance_scale_must_agree_with_the_guider(pipes):
    pipe, _, config = pipes("sd15")
    with pytest.raises(ValueError, match=r"guidance_scale=7.5 disagrees with guidance=DiffusersGuidance\("
                                         r"ClassifierFreeGuidance\(guidance_scale=5\)\)"):
        call(pipe, config, ClassifierFreeGuidance(guidance_scale=5.0), "ddim", noise_for(0), guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"guidance_rescale belongs to diffusers' own CFG.*ClassifierFreeGuidance"
                                         r"\(guidance_rescale=0.7\)"):
        call(pipe, config, ClassifierFreeGuidance(guidance_scale=5.0), "ddim", noise_for(0), guidance_rescale=0.7)


def test_fdg_without_kornia_names_the_package(monkeypatch):
    import diffkit.guidance.diffusers_guiders as dg

    monkeypatch.setattr(dg, "is_kornia_available", lambda: False)
    with pytest.raises(ImportError, match=r"FrequencyDecoupledGuidance needs the kornia package .*: "
                       r"pip install \"diffkit\[guiders\]\" \(or pip install kornia\)"):
        make_guider("fdg", 10.0)


def test_command_line_offers_every_guider_by_name_with_its_default():
    from diffkit.cli import DIFFUSERS_GUIDANCE_HELP, GUIDANCE_SCALE_DEFAULTS
    from diffkit.guidance.diffusers_guiders import GUIDERS

    assert list(DIFFUSERS_GUIDANCE_HELP) == list(GUIDERS)
    assert {k: GUIDANCE_SCALE_DEFAULTS[k] for k in GUIDERS} == {k: v[2] for k, v in GUIDERS.items()}
    g = make_guider("autoguidance", 5.0).guider
    assert (type(g).__name__, g.guidance_scale, g.dropout) == ("AutoGuidance", 5.0, 1.0)


def test_make_guider_sets_the_main_scale():
    assert make_guider("pag", 4.0).guider.skip_layer_guidance_scale == 4.0
    assert make_guider("seg").guider.seg_guidance_scale == 3.0
    assert make_guider("skip-layer", 2.0).guider.skip_layer_guidance_scale == 2.0
    assert make_guider("apg-mix", 9.0).guider.adaptive_projected_guidance_scale == 9.0
    for name in ("cfg-zero-star", "tcfg", "mambo"):
        assert make_guider(name, 6.0).scale == 6.0
    with pytest.raises(ValueError, match="unknown guider 'nope'; one of pag, seg, skip-layer"):
        make_guider("nope")


def test_cli_generate_with_a_diffusers_guider(tiny_paths, tmp_path, capsys):
    import json

    from diffkit.cli import main

    rc = main(["generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "2", "--quiet", "--guidance", "pag",
               "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "images.jsonl").read_text())
    assert record["guidance"] == "pag" and record["guidance_scale"] == 3.0
    rc = main(["generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "2", "--quiet", "--guidance", "fdg",
               "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    if is_kornia_available():
        assert rc == 0, err
        assert json.loads((tmp_path / "f" / "images.jsonl").read_text())["guidance"] == "fdg"
    else:
        assert rc != 0 and "--guidance fdg: FrequencyDecoupledGuidance needs the kornia package" in err
        assert "pip install kornia" in err
