"""AdvUnlearn: the inner attack, the outer step, what trains, the plug-and-play text encoder, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffkit
from diffkit.cli import main
from diffkit.erasure import AdvUnlearn, ErasureConfig, erase, make_accelerator, read_artifact, select_parameters
from diffkit.erasure.checkpoint import read_checkpoint
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.zoo import build_tiny_pipeline

RETAIN = ["a tree", "blue circle"]


def _cfg(**kw):
    opts = {"attack": "sign", "warmup_steps": 0, "retain_batch": 1, **kw.pop("options", {})}
    base = dict(method="advunlearn", concept="red star", retain_prompts=RETAIN, steps=2, sample_steps=3, lr=1e-3,
                options=opts)
    return ErasureConfig(**{**base, **kw})


def _ctx(pipe, cfg):
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    params = select_parameters(ctx.components, cfg.parameters)
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    for p in params.values():
        p.requires_grad_(True)
    return ctx, params


def test_defaults_follow_the_reference():
    cfg = ErasureConfig(method="advunlearn", concept="nudity", retain_prompts=RETAIN, steps=1000)
    m = AdvUnlearn(cfg)
    assert cfg.parameters == "text-encoder" and cfg.lr == 1e-5 and cfg.batch_size == 1
    assert m.options["gamma"] == 0.3 and m.options["prefix_tokens"] == 1 and m.options["retain_batch"] == 5
    assert m.options["attack"] == "adam" and m.attack_steps == 30 and m.options["attack_lr"] == 1e-3
    assert m.warmup_steps == 200 and m.preservation_weight == 0.3
    assert AdvUnlearn(cfg.replace(options={"attack": "sign"})).attack_steps == 1  # the fast variant: one step


def test_attack_improves_the_concept_reproduction_it_targets(load_tiny):
    pipe = load_tiny("sd15")
    cfg = _cfg(lr=1e-2, options={"attack": "adam", "attack_steps": 8, "attack_lr": 1e-2, "warmup_steps": 100,
                                 "gamma": 0})
    ctx, params = _ctx(pipe, cfg)
    m = AdvUnlearn(cfg)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    for _ in range(5):  # warm-up steps (plain ESD on the text encoder): an erased model to attack
        opt.zero_grad()
        m.backward(ctx, m.loss(ctx)[0])
        opt.step()
    for p in params.values():
        p.grad = None
    x_t, t = ctx.sample(["red star"], torch.tensor([1]), ctx.randn(1))
    with torch.no_grad():
        pred_c = ctx.predict(x_t, t, ctx.embed(["red star"], original=True), original=True)
    gen_state = ctx.rng.get_state()
    from diffkit.erasure.attack import random_prefix

    init = random_prefix(ctx.components["text_encoder"], 1, ctx.rng)
    ctx.rng.set_state(gen_state)  # the attack draws the same initial prefix
    params_before = {q: p.detach().clone() for q, p in ctx.trainable.items()}
    prefix, curve = m.attack(ctx, ["red star"], x_t, t, pred_c)
    assert prefix.shape == (1, ctx.prompts.embedding_dim) and len(curve) == 8

    def losses(p):
        with torch.no_grad():
            pred = ctx.predict(x_t, t, ctx.prompts.encode(["red star"], p), wrapped=False)
        return F.mse_loss(pred, pred_c)

    reproduce_0, reproduce_1 = losses(init), losses(prefix)
    assert curve[0] == pytest.approx(float(reproduce_0), rel=1e-5)
    # The attack's objective: the erased model under the adversarial prompt reproduces the original
    # model's concept prediction more closely than under the initial prefix (measured 0.00320 -> 0.00262).
    assert reproduce_1 < 0.9 * reproduce_0
    assert curve[-1] < curve[0]
    # Only the prefix moved: no model weight and no .grad touched.
    assert all(torch.equal(p, params_before[q]) and p.grad is None for q, p in ctx.trainable.items())


def test_outer_step_decreases_the_erasure_loss(load_tiny):
    pipe = load_tiny("sd15")
    cfg = _cfg(options={"attack": "adam", "attack_steps": 5, "attack_lr": 1e-2})
    ctx, params = _ctx(pipe, cfg)
    m = AdvUnlearn(cfg)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    state = ctx.rng.get_state()
    erase_losses = []
    for _ in range(6):  # the same draws every step (a fixed batch); the attack re-runs on the updated model
        ctx.rng.set_state(state)
        opt.zero_grad()
        loss, logs = m.loss(ctx)
        m.backward(ctx, loss)
        opt.step()
        erase_losses.append(logs["esd_loss"])
        assert float(loss.detach()) == pytest.approx(logs["esd_loss"] + 0.3 * logs["retain_loss"], rel=1e-5)
    assert erase_losses[-1] < 0.5 * erase_losses[0], erase_losses


def test_warmup_runs_without_the_attack(load_tiny, tmp_path):
    result = erase(load_tiny("sd15"), _cfg(steps=3, options={"warmup_steps": 2}), tmp_path / "w", progress=False)
    m = result.sidecar["metrics"]
    assert m["warmup_steps"] == 2 and m["attacked_steps"] == 1


def test_only_the_text_encoder_layers_change_and_it_is_plug_and_play(load_tiny, tmp_path, gen):
    pipe = load_tiny("sd15")
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    result = erase(pipe, _cfg(steps=2), tmp_path / "adv", progress=False)
    art = read_artifact(result.path)
    trained = {f"text_encoder.{n}" for n, _ in pipe.text_encoder.named_parameters() if "embeddings" not in n}
    assert set(art.names) == trained and art.sidecar["base_model"]["components"].keys() == {"text_encoder"}
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    te_after = pipe.text_encoder.state_dict()
    assert all(torch.equal(te_after[k], te_before[k]) for k in te_before if "embeddings" in k)
    changed = [k for k in te_before if "embeddings" not in k and not torch.equal(te_after[k], te_before[k])]
    assert len(changed) == len(trained)  # every trained tensor moved (all layers + final layer norm)
    assert any("final_layer_norm" in k for k in changed)

    # Plug-and-play: another pipeline with the same text encoder but a different U-Net takes it.
    other = diffkit.to_diffkit(build_tiny_pipeline("sd15", seed=1))
    other.set_progress_bar_config(disable=True)
    other.text_encoder.load_state_dict(te_before)
    assert any(not torch.equal(v, unet_before[k]) for k, v in other.unet.state_dict().items())
    before = other("red star", num_inference_steps=2, generator=gen(0), output_type="pt").images
    other.load_erasure(result.path)
    assert all(torch.equal(other.text_encoder.get_parameter(k[13:]), art.tensors[k]) for k in art.names)
    erased = other("red star", num_inference_steps=2, generator=gen(0), output_type="pt").images
    assert not torch.equal(before, erased)
    # It stacks with a U-Net erasure (disjoint tensors); a second text-encoder erasure overlaps.
    esd = erase(load_tiny("sd15"), ErasureConfig(method="esd", concept="red", steps=1, sample_steps=2),
                tmp_path / "esd", progress=False)
    pipe.load_erasure(esd.path)  # pipe already carries the AdvUnlearn erasure from training
    assert len(pipe.loaded_erasures) == 2
    with pytest.raises(ValueError, match="overlaps the loaded erasure"):
        other.load_erasure(result.path)
    assert other.unload_erasure() == 1
    assert all(torch.equal(v, te_before[k]) for k, v in other.text_encoder.state_dict().items())
    assert torch.equal(other("red star", num_inference_steps=2, generator=gen(0), output_type="pt").images, before)
    assert pipe.unload_erasure() == 2
    assert all(torch.equal(v, te_before[k]) for k, v in pipe.text_encoder.state_dict().items())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gamma": -1}, "options.gamma must be >= 0, got -1"),
        ({"attack": "pgd"}, "options.attack must be one of ('adam', 'sign'), got 'pgd'"),
        ({"attack_steps": 0}, "options.attack_steps must be an integer >= 1 (or null), got 0"),
        ({"attack_lr": 0}, "options.attack_lr must be > 0, got 0"),
        ({"prefix_tokens": 0}, "options.prefix_tokens must be an integer in [1, 16], got 0"),
        ({"attack_init": "zero"}, "options.attack_init must be one of ('latest', 'random'), got 'zero'"),
        ({"warmup_steps": -1}, "options.warmup_steps must be an integer >= 0 (or null), got -1"),
        ({"retain_batch": 0}, "options.retain_batch must be an integer >= 1, got 0"),
        ({"eta": 1}, "options ['eta'] are not known to method 'advunlearn'"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        ErasureConfig(method="advunlearn", concept="red", retain_prompts=RETAIN, options=options)


def test_retain_prompts_are_required_unless_gamma_is_zero():
    with pytest.raises(ValueError, match="method 'advunlearn' needs retain_prompts for its utility-retaining loss"):
        ErasureConfig(method="advunlearn", concept="red")
    assert ErasureConfig(method="advunlearn", concept="red", options={"gamma": 0}).retain_prompts == ()


def test_resume_restores_the_adversarial_prefix(load_tiny, interrupted_erase, tmp_path):
    cfg = _cfg(steps=4, checkpoint_every=2, options={"attack_init": "latest"})
    out = tmp_path / "j"
    interrupted_erase(cfg, out, AdvUnlearn, at=3)
    info, tensors = read_checkpoint(out / "checkpoint")
    assert info["step"] == 2 and tensors["method/adversarial_prefix"].shape == (1, 32)
    assert int(tensors["method/steps_done"][0]) == 2
    resumed = erase(load_tiny("sd15"), cfg, out, progress=False)
    straight = erase(load_tiny("sd15"), cfg, tmp_path / "straight", progress=False)
    assert resumed.resumed_from == 2
    a, b = read_artifact(resumed.path), read_artifact(straight.path)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    assert resumed.sidecar["metrics"]["losses"] == straight.sidecar["metrics"]["losses"]


def test_cli_and_batch_run_advunlearn(tiny_paths, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["erase", "--model", str(tiny_paths["sd15"]), "--out", str(out), "--method", "advunlearn",
                 "--concept", "red", "--retain", "a tree", "--steps", "1", "--sample-steps", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"trained: advunlearn erasing ['red'] -> {out} (1 steps")
    batch = tmp_path / "jobs.yaml"
    batch.write_text("defaults: {steps: 1, sample_steps: 2, retain_prompts: [a tree], num_images: 1, batch_size: 1,\n"
                     "           options: {}}\nmethods: [advunlearn, doco]\nconcepts: [{concept: red, anchor: blue}]\n"
                     "per_method: {advunlearn: {options: {attack: sign, retain_batch: 1}}}\n")
    assert main(["erase-batch", str(batch), "--model", str(tiny_paths["sd15"]), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "advunlearn-red: trained" in text and "doco-red: trained" in text
    assert read_artifact(tmp_path / "b" / "advunlearn-red").sidecar["hyperparameters"]["options"]["attack"] == "sign"
