"""The soft-prompt attack: prefix encoding, the inner loop, UnlearnDiffAtk's loss, ASR bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffkit.erasure.attack import (
    AttackConfig,
    attack_success_rate,
    diffusion_attack_loss,
    optimize_prefix,
    random_prefix,
)
from diffkit.erasure.conditioning import PromptEncoder
from diffkit.erasure.sampling import ddim_scheduler


def test_prefix_replaces_placeholder_embeddings(load_tiny):
    pipe = load_tiny("sd15")
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu", cache=False)
    ids = enc.token_ids(["red star"], prefix_tokens=2)
    plain = enc.token_ids(["red star"])
    assert ids.shape == plain.shape == (1, 77)
    assert ids[0, 0] == plain[0, 0] and (ids[0, 1:3] == enc.placeholder_id).all()
    assert torch.equal(ids[0, 3:5], plain[0, 1:3])
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        same = enc.encode(["red star"], table[[enc.placeholder_id] * 2])  # the placeholders' own embeddings
        direct = pipe.text_encoder(ids)[0]
        assert torch.allclose(same, direct, atol=1e-6)
        other = enc.encode(["red star"], torch.randn(2, table.shape[1]))
        assert not torch.allclose(other, direct, atol=1e-3)
        # Without a prefix the encoding is exactly what the pipeline computes.
        ref = pipe.encode_prompt("red star", "cpu", 1, False)[0]
        assert torch.allclose(enc.encode(["red star"]), ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"prefix_tokens must be in \[0, 74\], got 80"):
        enc.token_ids(["x"], 80)


def test_optimize_prefix_decreases_its_loss_and_moves_only_the_prefix(load_tiny):
    pipe = load_tiny("sd15")
    pipe.unet.requires_grad_(True)
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu", cache=False)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = ddim_scheduler(pipe.scheduler.config, 1000)
    t = torch.tensor([500])
    x_t = sched.add_noise(x0, noise, t)

    def loss_fn(emb, i):  # fixed (t, eps): a deterministic objective
        return F.mse_loss(pipe.unet(x_t, t, encoder_hidden_states=emb).sample, noise)

    init = random_prefix(pipe.text_encoder, 3, torch.Generator().manual_seed(2))
    for update, lr in (("adam", 0.05), ("sign", 0.01)):
        prefix, losses = optimize_prefix(lambda p: enc.encode(["red star"], p), loss_fn, init, steps=15, lr=lr,
                                         update=update)
        assert prefix.shape == (3, 32) and len(losses) == 15
        assert losses[-1] < losses[0], (update, losses)
        assert all(p.grad is None for p in pipe.unet.parameters())
    one, curve = optimize_prefix(lambda p: enc.encode(["red star"], p), loss_fn, init, steps=1, lr=0.01,
                                 update="sign")
    with torch.enable_grad():
        p = init.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(enc.encode(["red star"], p), 0), [p])
    assert torch.allclose(one, init - 0.01 * g.sign())  # the fast variant is one gradient-sign step
    with pytest.raises(ValueError, match=r"update must be one of \('adam', 'sign'\), got 'pgd'"):
        optimize_prefix(lambda p: p, loss_fn, init, steps=1, lr=0.1, update="pgd")


def test_diffusion_attack_loss_is_unlearndiffatk_objective(load_tiny):
    pipe = load_tiny("sd15")
    sched = ddim_scheduler(pipe.scheduler.config, 1000)
    x0 = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 77, 32)
    loss = diffusion_attack_loss(pipe.unet, sched, x0, torch.Generator().manual_seed(4))(emb, 0)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (1,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        expected = ((pipe.unet(x_t, t, encoder_hidden_states=emb).sample - noise) ** 2).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)


def test_attack_success_rate_counts_and_restores(load_tiny):
    pipe = load_tiny("sd15")
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    seen = []

    def judge(images):  # "shows the concept" only for the attacked (second) image of each pair
        seen.append(images.shape)
        return [False, True]

    cfg = AttackConfig(prefix_tokens=2, steps=2, num_inference_steps=2)
    report = attack_success_rate(pipe, ["red star", "red"], judge, torch.randn(2, 4, 8, 8), cfg)
    assert report.asr == 1.0 and report.pre_attack_rate == 0.0
    assert report.success == [True, True] and len(report.losses[0]) == 2
    assert seen == [torch.Size([2, 3, 64, 64])] * 2 and report.images.shape == (2, 3, 64, 64)
    assert 0.0 <= float(report.images.min()) and float(report.images.max()) <= 1.0
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    pre = attack_success_rate(pipe, ["red"], lambda im: [True, False], torch.randn(1, 4, 8, 8), cfg)
    assert pre.asr == 1.0 and pre.pre_attack_rate == 1.0  # already shown without attack: a success
    fail = attack_success_rate(pipe, ["red"], lambda im: [False, False], torch.randn(1, 4, 8, 8), cfg)
    assert fail.asr == 0.0 and fail.to_dict()["success"] == [False]
    with pytest.raises(ValueError, match=r"target_latents must hold one latent per prompt \(2\), got 1"):
        attack_success_rate(pipe, ["a", "b"], judge, torch.randn(1, 4, 8, 8), cfg)
    with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
        attack_success_rate(pipe, [], judge, torch.randn(0, 4, 8, 8), cfg)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(prefix_tokens=0), "prefix_tokens must be an integer >= 1, got 0"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(lr=0), "lr must be > 0, got 0"),
        (dict(update="pgd"), "update must be one of ('adam', 'sign'), got 'pgd'"),
        (dict(guidance_scale=-1), "guidance_scale must be >= 0, got -1"),
    ],
)
def test_attack_config_validation(kw, message):
    with pytest.raises(ValueError) as e:
        AttackConfig(**kw)
    assert message in str(e.value)
