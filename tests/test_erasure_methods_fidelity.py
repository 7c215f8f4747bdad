"""Issue 17, parts 1-2 and the smaller defects: each method's typed config in the registry (old job files
and their hashes unchanged), DoCo as its reference code (one x_t for the discriminator's real and fake,
the clipped-cosine gradient correction, no generator update in the warm-up, no anchor MSE), and SalUn's
substitute concept and text-encoder saliency."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from diffkit.erasure import (
    METHODS,
    AdvUnlearnConfig,
    DoCo,
    DoCoConfig,
    ErasureConfig,
    ErasureMethod,
    ESDConfig,
    MethodConfig,
    SalUnConfig,
    erase,
    get_method_config,
    make_accelerator,
    read_artifact,
    reference_correction,
    register_method,
    select_parameters,
)
from diffkit.erasure.doco import predicted_x0
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.erasure.salun import SalUn
from diffkit.erasure.surgery import clip_global_norm, correct_conflicting, project_conflicting

#: Fields a full-rank job's hash leaves out (jobs from before each option keep their hash).
UNHASHED = ("checkpoint_every", "preserve_gradient", "parametrization", "lora_rank", "lora_alpha")

def _ctx(pipe, cfg, method_cls):
    """A training context as the engine builds it: candidates known before prepare, then the trained set."""
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    candidates = select_parameters(ctx.components, cfg.parameters)
    ctx.trainable = candidates
    m = method_cls(cfg)
    params = m.prepare(ctx, candidates)
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    for p in params.values():
        p.requires_grad_(True)
    return ctx, params, m


def _doco(**kw):
    base = dict(method="doco", concept="red star", anchor="blue circle", retain_prompts=["a tree"], steps=4,
                sample_steps=3, batch_size=2, num_images=2, lr=1e-3)
    return ErasureConfig(**{**base, **kw})


# --- part 1: registry and typed configs -------------------------------------------------------------------
def test_every_method_registers_its_own_frozen_config_class():
    assert {n: get_method_config(n) for n in METHODS} == {"esd": ESDConfig, "salun": SalUnConfig,
                                                          "advunlearn": AdvUnlearnConfig, "doco": DoCoConfig}
    for cls in METHODS.values():
        assert issubclass(cls, ErasureMethod) and issubclass(cls.config_class, MethodConfig)
        assert cls.config_class.__dataclass_params__.frozen
    cfg = ErasureConfig(method="doco", concept="red", anchor="blue", eta=2.0, num_images=3,
                        options={"surgery_lambda": 0.5})
    typed = cfg.method_config
    assert isinstance(typed, DoCoConfig) and typed.eta == 2.0 and typed.num_images == 3
    assert typed.surgery_lambda == 0.5 and typed.discriminator_lr == 5e-4  # given, and the default
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.surgery_lambda = 2.0
    assert DoCo(cfg).cfg is typed and DoCo(cfg).options["surgery_lambda"] == 0.5
    assert ErasureConfig(method="esd", concept="red", eta=1.5).method_config == ESDConfig(eta=1.5)
    assert ErasureConfig(method="salun", concept="red", retain_prompts=["x"], beta=0.1).method_config == SalUnConfig(
        beta=0.1, saliency_fraction=0.5, mask_guidance=7.5, num_images=8)


def test_register_method_refuses_a_config_that_is_not_a_method_config():
    # (A MethodConfig subclass is frozen by construction: Python refuses a non-frozen child of a frozen one.)
    @dataclasses.dataclass(frozen=True)
    class Stray:
        x: int = 1

    class Bad(ErasureMethod):
        name = "bad-method"
        config_class = Stray

    for conf in (Stray, dict):
        Bad.config_class = conf
        with pytest.raises(ValueError, match="method 'bad-method': config_class must be a MethodConfig dataclass"):
            register_method(Bad)
    assert "bad-method" not in METHODS


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("esd", {"gamma": 1}, "options ['gamma'] are not known to method 'esd'; allowed: none"),
        ("salun", {"beta": 0.1}, "options ['beta'] are not known to method 'salun'; allowed: none"),
        ("advunlearn", {"eta": 1, "gama": 2},
         "options ['eta', 'gama'] are not known to method 'advunlearn'; allowed: gamma, retain_batch, attack, "
         "attack_steps, attack_lr, prefix_tokens, attack_init, warmup_steps"),
        ("doco", {"lambda": 1},
         "options ['lambda'] are not known to method 'doco'; allowed: discriminator_lr, discriminator_warmup, "
         "adversarial_weight, prior, prior_weight, surgery_rule, surgery_lambda, max_grad_norm, anchor_weight, "
         "target, discriminator_channels, discriminator_layers"),
        ("advunlearn", {"attack_lr": -1}, "options.attack_lr must be > 0, got -1"),
        ("doco", {"surgery_lambda": "1"}, "options.surgery_lambda must be >= 0, got '1'"),
        ("doco", {"discriminator_warmup": 1.5},
         "options.discriminator_warmup must be an integer >= 0 (or null), got 1.5"),
    ],
)
def test_per_method_option_messages(method, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ErasureConfig(method=method, concept="red", anchor="blue", retain_prompts=["a tree"], options=options)


OLD_STYLE_YAML = {
    "adv.yaml": ("method: advunlearn\nconcept: [red, crimson]\nretain_prompts: [a blue circle]\nsteps: 50\n"
                 "options:\n  attack: sign\n  gamma: 0.5\n"),
    "doco.yaml": ("method: doco\nconcept: red\nanchor: blue\nretain_prompts: [a tree]\nsteps: 200\nlr: 0.0005\n"
                  "batch_size: 2\noptions: {discriminator_warmup: 50, prior_weight: 1.0, target: esd}\n"),
    "salun.yaml": ("method: salun\nconcept: [red, crimson]\nanchor: green\nretain_prompts: [a blue circle]\n"
                   "beta: 0.1\nsaliency_fraction: 0.25\nmask_guidance: 5\nnum_images: 4\n"),
}


def test_old_style_job_files_load_into_the_typed_configs(tmp_path):
    for name, text in OLD_STYLE_YAML.items():
        (tmp_path / name).write_text(text)
    adv = ErasureConfig.from_yaml(tmp_path / "adv.yaml")
    assert adv.options == {"attack": "sign", "gamma": 0.5}
    assert (adv.method_config.attack, adv.method_config.gamma, adv.method_config.retain_batch) == ("sign", 0.5, 5)
    doco = ErasureConfig.from_yaml(tmp_path / "doco.yaml")
    assert doco.method_config.discriminator_warmup == 50 and doco.method_config.target == "esd"
    salun = ErasureConfig.from_yaml(tmp_path / "salun.yaml")
    assert salun.method_config == SalUnConfig(beta=0.1, saliency_fraction=0.25, mask_guidance=5, num_images=4)
    for cfg in (adv, doco, salun):  # the flat form round-trips with its hash
        again = ErasureConfig.from_dict(cfg.to_dict())
        assert again == cfg and again.config_hash() == cfg.config_hash()


#: config_hash of existing-style jobs, computed with the code before the typed configs (commit 839fae8).
PINNED = {
    "c3f1881f6d8be019": dict(method="esd", concept="red"),
    "a9a26f55a3c95915": dict(method="esd", concept=["red", "crimson"], anchor="", eta=1.0, steps=300, lr=5e-4,
                             batch_size=1, sample_steps=10, parameters="esd-x"),
    "23d3cf5aebb0ef67": dict(method="esd", concept="red", retain_prompts=["a blue circle"], preserve_gradient=True),
    "6ee5ee3afbbcee5f": dict(method="salun", concept=["red", "crimson"], anchor="green",
                             retain_prompts=["a blue circle", "a green square"], steps=100, lr=2e-4, batch_size=4,
                             num_images=16),
    "d6e1326b68595164": dict(method="salun", concept="red", anchor="", retain_prompts=["a blue circle"]),
    "efe175205ba86219": dict(method="advunlearn", concept="red", retain_prompts=["a blue circle"], steps=200, lr=2e-4,
                             options={"attack": "sign", "retain_batch": 2}),
    "8e991902ed4f8a11": dict(method="advunlearn", concept="red", retain_prompts=["a blue circle"]),
}


@pytest.mark.parametrize("expected", sorted(PINNED))
def test_config_hash_of_unchanged_jobs_is_unchanged(expected):
    assert ErasureConfig(**PINNED[expected]).config_hash() == expected


def test_config_hash_of_unchanged_yaml_job_is_unchanged(tmp_path):
    (tmp_path / "adv.yaml").write_text(OLD_STYLE_YAML["adv.yaml"])
    assert ErasureConfig.from_yaml(tmp_path / "adv.yaml").config_hash() == "54576f662f87b26a"


def test_config_hash_changes_where_the_training_changed():
    # DoCo now trains the reference algorithm, and SalUn without an anchor trains towards a substitute: a
    # finished artifact of the old algorithm must not be reused for them (these were the old hashes).
    doco = ErasureConfig(method="doco", concept="red", anchor="blue", retain_prompts=["a tree"], steps=200, lr=5e-4,
                         batch_size=2, options={"discriminator_warmup": 50})
    assert doco.config_hash() != "127ea353bc9146bc" and doco.to_dict().get("method_revision") is None
    salun = ErasureConfig(method="salun", concept="red", retain_prompts=["a blue circle"])
    assert salun.anchor == "a blue circle" and salun.config_hash() != "d6e1326b68595164"
    # SalUn jobs that may train the text encoder now compute saliency over it: revision 2 enters their hash
    # (hand-computed: the flat job plus method_revision), while U-Net-only SalUn jobs keep theirs (PINNED).
    import hashlib
    import json

    for params in ("text-encoder", ["text_encoder\\..*q_proj.*"], ["unet\\..*attn2.*", "text_encoder\\..*"]):
        job = ErasureConfig(method="salun", concept="red", anchor="green", retain_prompts=["a blue circle"],
                            parameters=params)
        d = {k: v for k, v in job.to_dict().items() if k not in UNHASHED}
        d["method_revision"] = 2
        assert job.config_hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    unet_only = ErasureConfig(method="salun", concept="red", anchor="green", retain_prompts=["a blue circle"],
                              parameters=["unet\\..*attn2.*"])
    d = {k: v for k, v in unet_only.to_dict().items() if k not in UNHASHED}
    assert unet_only.config_hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- part 2: DoCo as its reference code -----------------------------------------------------------------
def test_discriminator_real_and_fake_come_from_one_noisy_latent(load_tiny):
    cfg = _doco(options={"discriminator_warmup": 0})
    ctx, params, m = _ctx(load_tiny("sd15"), cfg, DoCo)
    unet_calls, d_inputs = [], []
    h1 = ctx.components["unet"].register_forward_hook(
        lambda mod, args, kwargs, out: unet_calls.append((args[0].detach().clone(), args[1].detach().clone(),
                                                          kwargs["encoder_hidden_states"].detach().clone(),
                                                          out.sample.detach().clone())), with_kwargs=True)
    h2 = m.discriminator.register_forward_pre_hook(lambda mod, args: d_inputs.append(args[0].detach().clone()))
    state = ctx.rng.get_state()
    try:
        m.loss(ctx)
    finally:
        h1.remove(), h2.remove()
    # The draws: concept prompts, anchor images, t ~ U[0, T), noise; x_t = q(x_t | anchor image).
    ctx.rng.set_state(state)
    ctx.randint(2, 1)
    idx, t, noise = ctx.randint(2, len(m.anchor_latents)), ctx.randint(2, ctx.num_train_timesteps), ctx.randn(2)
    x_t = ctx.add_noise(m.anchor_latents[idx], noise, t)
    anchor_emb = ctx.embed(["blue circle"] * 2, original=True)
    concept_emb = ctx.embed(["red star"] * 2)
    assert len(unet_calls) == 2  # frozen on the anchor prompt, trained on the concept prompt
    (x_real, t_real, e_real, out_real), (x_fake, t_fake, e_fake, out_fake) = unet_calls
    assert torch.equal(x_real, x_t) and torch.equal(x_fake, x_t) and torch.equal(t_real, t) and torch.equal(t_fake, t)
    assert torch.equal(e_real, anchor_emb) and torch.equal(e_fake, concept_emb)
    # D sees real, fake (its own step), then fake again (the generator's loss): the x0_hat of that same x_t.
    assert len(d_inputs) == 3
    acp = ctx.scheduler.alphas_cumprod
    assert torch.allclose(d_inputs[0], predicted_x0(x_t, t, out_real, acp), atol=1e-6)
    assert torch.allclose(d_inputs[1], predicted_x0(x_t, t, out_fake, acp), atol=1e-6)
    assert torch.equal(d_inputs[1], d_inputs[2])


def test_reference_correction_on_constructed_vectors():
    g_u = {"a": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.0, 0.0, 12.0])}  # ||g_u|| = 13
    g_p = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0, 0.0, 1.0])}  # ||g_p|| = sqrt(5)
    # 1. both clipped to norm 1 over all tensors together (clip_grad_norm_'s scale 1 / (||g|| + 1e-6))
    clipped = clip_global_norm(g_u, 1.0)
    assert torch.allclose(clipped["a"], torch.tensor([3 / 13, -4 / 13]), atol=1e-6)
    assert torch.allclose(clip_global_norm(g_p, 1.0)["b"], torch.tensor([0, 0, 1 / math.sqrt(5)]), atol=1e-6)
    assert clip_global_norm({"x": torch.tensor([0.3, 0.4])}, 1.0)["x"].tolist() == pytest.approx([0.3, 0.4])
    # 2. tensor a conflicts: cos = (0.6, -0.8).(0, 1) = -0.8, so g_u_a - 1 (-0.8) (0, 1); b agrees (cos 1): unchanged
    out, conflicts = reference_correction(g_u, g_p)
    assert conflicts == 1
    assert torch.allclose(out["a"], torch.tensor([3 / 13, -4 / 13 + 0.8]), atol=1e-6)
    assert torch.allclose(out["b"], torch.tensor([0.0, 0.0, 12 / 13]), atol=1e-6)
    half, _ = reference_correction(g_u, g_p, lam=0.5)
    assert torch.allclose(half["a"], torch.tensor([3 / 13, -4 / 13 + 0.4]), atol=1e-6)
    # 3. only g_u is in the result (no + w g_p), and it is not the exact projection (which would give (3/13, 0))
    assert set(out) == {"a", "b"}
    exact, _ = project_conflicting(clipped["a"], g_p["a"])
    assert torch.allclose(exact, torch.tensor([3 / 13, 0.0]), atol=1e-6) and not torch.allclose(exact, out["a"])
    unchanged, hit = correct_conflicting(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert not hit and unchanged.tolist() == [1.0, 1.0]


def test_doco_applies_only_the_corrected_unlearning_gradient(load_tiny, monkeypatch):
    import diffkit.erasure.doco as doco_module

    seen = {}
    real = doco_module.reference_correction

    def recording(g_u, g_p, lam, max_norm):
        seen.update(g_u={q: g.clone() for q, g in g_u.items()}, g_p={q: g.clone() for q, g in g_p.items()},
                    lam=lam, max_norm=max_norm)
        seen["out"], conflicts = real(g_u, g_p, lam, max_norm)
        return seen["out"], conflicts

    monkeypatch.setattr(doco_module, "reference_correction", recording)
    cfg = _doco(options={"discriminator_warmup": 0})
    ctx, params, m = _ctx(load_tiny("sd15"), cfg, DoCo)
    loss, logs = m.loss(ctx)
    assert set(logs) >= {"adversarial_loss", "d_loss"} and "anchor_loss" not in logs  # no anchor MSE by default
    assert float(loss.detach()) == pytest.approx(logs["adversarial_loss"], rel=1e-6)  # L_G is the BCE alone
    m.backward(ctx, loss)
    assert seen["lam"] == 1.0 and seen["max_norm"] == 1.0
    assert any(float(g.abs().max()) > 0 for g in seen["g_p"].values())
    for q, p in params.items():
        assert torch.equal(p.grad, seen["out"][q])  # exactly the corrected g_u, without + w g_p
    # ...and the recorded g_u is the adversarial loss's gradient alone (the prior's went into g_p only).
    assert m.conflicts == sum(bool(torch.dot(seen["g_u"][q].flatten(), seen["g_p"][q].flatten()) < 0) for q in params)


def test_no_generator_update_in_the_warmup_through_the_engine(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    cfg = _doco(steps=3, options={"discriminator_warmup": 3})  # every step in the warm-up; surgery and prior on
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = erase(pipe, cfg, tmp_path / "w", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    m = result.sidecar["metrics"]
    assert m["generator_steps"] == 0 and m["surgery_tensor_steps"] == 0 and m["discriminator_warmup"] == 3
    art = read_artifact(result.path)
    assert all(torch.equal(art.tensors[q], before[q.split(".", 1)[1]]) for q in art.names)


# --- smaller defects: SalUn's substitute and text-encoder saliency ------------------------------------------
def test_salun_default_substitute_is_a_concrete_concept():
    cfg = ErasureConfig(method="salun", concept="red", retain_prompts=["green", "a blue circle"])
    assert cfg.anchor == "green"  # the first retain prompt, as the reference's "next class"
    assert ErasureConfig(method="salun", concept="red", anchor="blue", retain_prompts=["green"]).anchor == "blue"
    assert ErasureConfig(method="esd", concept="red").anchor == ""  # ESD's equation
    from diffkit.zoo.shapes import substitute

    assert [substitute(c) for c in ("red", "cyan", "star", "striped", "crimson")] == [
        "green", "red", "heart", "dotted", "green"]


TE_AND_CROSS = [r"text_encoder\.encoder\.layers\.0\..*", r"unet\..*attn2\.to_k\.weight"]


def test_salun_saliency_ranks_text_encoder_gradients(load_tiny):
    cfg = ErasureConfig(method="salun", concept="red star", anchor="blue circle", retain_prompts=["green square"],
                        parameters=TE_AND_CROSS, num_images=2, batch_size=2, sample_steps=2, steps=1, lr=1e-3)
    pipe = load_tiny("sd15")
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    candidates = select_parameters(ctx.components, cfg.parameters)
    ctx.trainable = candidates  # the engine's order: candidates known before prepare
    m = SalUn(cfg)
    trained = m.prepare(ctx, candidates)
    grads = m._forget_gradients(ctx, candidates, torch.Generator().manual_seed(0))
    te = [q for q in candidates if q.startswith("text_encoder.")]
    # The encoder is in the saliency graph: every weight matrix of its layer gets a gradient (a key bias
    # would not: softmax ignores a shift shared by all keys).
    assert te and all(float(grads[q].abs().max()) > 0 for q in te if q.endswith("weight"))
    salient_te = sum(int(m.masks[q].sum()) for q in te if q in m.masks)
    assert salient_te > 0 and any(q in trained for q in te)
    assert m.salient_weights == math.ceil(0.5 * sum(p.numel() for p in candidates.values()))


def test_salun_with_text_encoder_trains_salient_encoder_weights(load_tiny, tmp_path):
    cfg = ErasureConfig(method="salun", concept="red star", anchor="blue circle", retain_prompts=["green square"],
                        parameters=[TE_AND_CROSS[0]], num_images=2, batch_size=2, sample_steps=2, steps=2, lr=1e-2)
    pipe = load_tiny("sd15")
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    result = erase(pipe, cfg, tmp_path / "s", progress=False)
    art = read_artifact(result.path)
    assert art.names and all(q.startswith("text_encoder.") for q in art.names)
    after = pipe.text_encoder.state_dict()
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert moved and all(f"text_encoder.{k}" in art.names for k in moved)


def test_conditioning_of_a_training_text_encoder_is_never_stale(load_tiny):
    cfg = ErasureConfig(method="salun", concept="red", anchor="green", retain_prompts=["x"], parameters="text-encoder")
    pipe = load_tiny("sd15")
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    params = select_parameters(ctx.components, cfg.parameters)
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    with torch.no_grad():
        first = ctx.embed(["green"])
        for p in params.values():  # a training step's worth of change
            p.add_(0.01)
        now = ctx.embed(["green"])
        fresh = ctx.prompts.encode(["green"], cache=False)
        original = ctx.embed(["green"], original=True)
    assert not torch.equal(now, first) and torch.equal(now, fresh)  # SalUn's substitute conditioning is current
    assert torch.equal(original, first)  # the original model's conditioning is still the original's
