"""Parameter selection, ESD's and SalUn's losses against the papers' formulas written out, the mask."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffkit.erasure import ErasureConfig, make_accelerator, saliency_mask, select_parameters
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.erasure.salun import SalUn
from diffkit.erasure.sampling import ddim_scheduler


def _embed(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _ctx(pipe, cfg, trainable=None):
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    if trainable is not None:
        ctx.trainable = trainable
        ctx.original = OriginalWeights(trainable)
        ctx.pristine = False
    return ctx


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


# --- selection ------------------------------------------------------------------------------------------
def test_presets_follow_the_reference_code(load_tiny):
    pipe = load_tiny("sd15")
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    attn2 = [n for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    x = select_parameters(comps, "esd-x")
    # to_q, to_k, to_v (weights, no bias) and to_out.0 (weight + bias) of every cross-attention
    assert len(x) == 5 * len(attn2) and all(".attn2." in q for q in x)
    strict = select_parameters(comps, "esd-x-strict")
    assert len(strict) == 2 * len(attn2)
    assert all(q.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for q in strict)
    u = select_parameters(comps, "esd-u")
    assert not any("attn2" in q for q in u) and not any("norm" in q for q in u)
    assert "unet.conv_in.weight" in u and "unet.time_embedding.linear_1.weight" in u
    n_unet = len(list(pipe.unet.parameters()))
    assert len(select_parameters(comps, "unet-all")) == n_unet
    te = select_parameters(comps, "text-encoder")
    assert all(q.startswith("text_encoder.") and "embeddings" not in q for q in te)
    assert "text_encoder.final_layer_norm.weight" in te
    rx = select_parameters(comps, [r"unet\.conv_in\..*", r"text_encoder\.final_layer_norm\.weight"])
    assert sorted(rx) == ["text_encoder.final_layer_norm.weight", "unet.conv_in.bias", "unet.conv_in.weight"]
    with pytest.raises(ValueError, match=r"parameters \['nothing'\] select no tensor of this pipeline"):
        select_parameters(comps, ("nothing",))
    with pytest.raises(ValueError, match="needs a text_encoder, which this pipeline lacks"):
        select_parameters({"unet": pipe.unet}, "text-encoder")


# --- ESD ------------------------------------------------------------------------------------------------
def test_esd_target_is_negative_guidance():
    c, u, a = torch.randn(3, 2, 4, 8, 8).unbind(0)
    from diffkit.erasure import esd_target

    eta = 1.7
    assert torch.equal(esd_target(c, u, u, eta), u - eta * (c - u))
    assert torch.equal(esd_target(c, u, a, eta), a - eta * (c - u))


@pytest.mark.parametrize("anchor", ["", "blue circle"])
def test_esd_loss_matches_the_paper(load_tiny, anchor):
    pipe = load_tiny("sd15")
    cfg = ErasureConfig(method="esd", concept=["red star", "red"], anchor=anchor, eta=1.5, sample_steps=5, seed=3)
    frozen = copy.deepcopy(pipe.unet)
    trainable = select_parameters({"unet": pipe.unet}, "esd-x")
    ctx = _ctx(pipe, cfg, trainable)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    from diffkit.erasure import ESD

    calls, handle = _count_calls(pipe.unet)
    loss, _ = ESD(cfg).loss(ctx)
    handle.remove()
    # The same draws, the written-out equation, the frozen copy of the original U-Net.
    g = torch.Generator().manual_seed(3)
    which = int(torch.randint(0, 2, (1,), generator=g))
    stop = int(torch.randint(0, 5, (1,), generator=g))
    x = torch.randn((1, 4, 8, 8), generator=g)
    prompt = cfg.concept[which]
    sched = ddim_scheduler(pipe.scheduler.config, 5)
    e_c, e_u, e_a = _embed(pipe, [prompt]), _embed(pipe, [""]), _embed(pipe, [anchor])
    with torch.no_grad():
        for i in range(stop):
            t = sched.timesteps[i]
            u, c = frozen(x, t, e_u).sample, frozen(x, t, e_c).sample
            x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
        t = sched.timesteps[stop]
        eps_c, eps_u, eps_a = (frozen(x, t, e).sample for e in (e_c, e_u, e_a))
        target = eps_a - 1.5 * (eps_c - eps_u)
        pred = pipe.unet(x, t, e_c).sample
    expected = ((pred - target) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-7), (loss, expected)
    # U-Net evaluations: one per DDIM step ([u, c] batched), one frozen batch, one trained.
    assert len(calls) == stop + 2


def test_original_weights_swap_is_exact(load_tiny):
    pipe = load_tiny("sd15")
    params = select_parameters({"unet": pipe.unet}, "esd-x-strict")
    before = {q: p.detach().clone() for q, p in params.items()}
    orig = OriginalWeights(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    with orig.swapped():
        assert all(torch.equal(params[q], before[q]) for q in params)
    assert all(torch.equal(params[q], before[q] + 1.0) for q in params)


# --- SalUn ----------------------------------------------------------------------------------------------
def test_saliency_mask_keeps_the_largest_gradients_globally():
    grads = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[2.0, -0.2], [0.0, 4.0]])}
    m = saliency_mask(grads, 0.5)  # 7 weights -> ceil(3.5) = 4 largest |g|: 5, 4, 2, 0.3
    assert m["a"].tolist() == [False, True, True] and m["b"].tolist() == [[True, False], [False, True]]
    ties = saliency_mask({"a": torch.ones(5)}, 0.4)  # exactly ceil(2.0) = 2, ties broken in order
    assert ties["a"].tolist() == [True, True, False, False, False]
    assert all(v.all() for v in saliency_mask(grads, 1.0).values())
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        saliency_mask(grads, 0)


def _salun_cfg(**kw):
    base = dict(method="salun", concept="red star", anchor="blue circle", retain_prompts=["green square", "a tree"],
                num_images=2, batch_size=2, sample_steps=2, steps=2, lr=1e-3, seed=5, beta=0.5)
    return ErasureConfig(**{**base, **kw})


def test_salun_mask_is_top_half_of_forget_gradient(load_tiny):
    pipe = load_tiny("sd15")
    cfg = _salun_cfg()
    ctx = _ctx(pipe, cfg)
    candidates = select_parameters(ctx.components, "unet-all")
    method = SalUn(cfg)
    trained = method.prepare(ctx, candidates)
    total = sum(p.numel() for p in candidates.values())
    assert method.salient_weights == math.ceil(0.5 * total)
    assert set(trained) == set(method.masks) and all(m.any() for m in method.masks.values())
    # Reproduce the saliency loss's gradient (reference code: guidance-combined, scale 7.5, negated MSE).
    g = torch.Generator().manual_seed(6)
    _ = [torch.randn((2, 4, 8, 8), generator=g) for _ in range(2)]  # the forget and retain images' noise
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    x_t = ctx.scheduler.add_noise(method.forget, noise, t)
    for p in candidates.values():
        p.requires_grad_(True)
    e_c, e_u = _embed(pipe, ["red star"] * 2), _embed(pipe, [""] * 2)
    pred_c, pred_u = pipe.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([e_c, e_u])).sample.chunk(2)
    guided = 8.5 * pred_c - 7.5 * pred_u
    (-((guided - noise) ** 2).mean()).backward()
    grads = {q: p.grad for q, p in candidates.items()}
    expected = saliency_mask(grads, 0.5)
    # Same ranking up to float round-off at the threshold (prompt batches are encoded in another grouping).
    differ = sum(int((method.masks.get(q, torch.zeros_like(expected[q])).cpu() != expected[q]).sum()) for q in expected)
    assert differ <= 1e-4 * total, differ
    assert sum(int(expected[q].sum()) for q in expected) == method.salient_weights


def test_salun_loss_is_random_label_plus_retain(load_tiny):
    pipe = load_tiny("sd15")
    cfg = _salun_cfg()
    ctx = _ctx(pipe, cfg)
    method = SalUn(cfg)
    trained = method.prepare(ctx, select_parameters(ctx.components, "unet-all"))
    ctx.trainable, ctx.pristine = trained, False
    state = ctx.rng.get_state()
    loss, logs = method.loss(ctx)
    g = torch.Generator()
    g.set_state(state)
    fi = torch.randint(0, 2, (2,), generator=g)
    ft = torch.randint(0, 1000, (2,), generator=g)
    fn = torch.randn((2, 4, 8, 8), generator=g)
    ri = torch.randint(0, 2, (2,), generator=g)
    rt = torch.randint(0, 1000, (2,), generator=g)
    rn = torch.randn((2, 4, 8, 8), generator=g)
    x_f = ctx.scheduler.add_noise(method.forget[fi], fn, ft)
    x_r = ctx.scheduler.add_noise(method.retain[ri], rn, rt)
    with torch.no_grad():
        forget = F.mse_loss(pipe.unet(x_f, ft, _embed(pipe, ["red star"] * 2)).sample,
                            pipe.unet(x_f, ft, _embed(pipe, ["blue circle"] * 2)).sample)
        retain = F.mse_loss(pipe.unet(x_r, rt, _embed(pipe, [method.retain_prompts[i] for i in ri])).sample, rn)
    assert torch.allclose(loss.detach(), forget + 0.5 * retain, rtol=1e-4)
    assert logs["forget_loss"] == pytest.approx(float(forget), rel=1e-4)
    assert logs["retain_loss"] == pytest.approx(float(retain), rel=1e-4)
    # The gradient transform multiplies by the 0/1 mask.
    for p in trained.values():
        p.grad = torch.ones_like(p)
    method.transform_gradients(ctx, trained)
    assert all(torch.equal(trained[q].grad, method.masks[q].float()) for q in trained)


def test_v_prediction_target_is_velocity(load_tiny):
    pipe = load_tiny("sd2")
    ctx = _ctx(pipe, ErasureConfig(concept="red"))
    x0, noise = torch.randn(2, 2, 4, 8, 8).unbind(0)
    t = torch.tensor([10, 700])
    a = ctx.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ctx.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(ctx.diffusion_target(x0, noise, t), a * noise - s * x0, atol=1e-6)
    assert torch.allclose(ctx.add_noise(x0, noise, t), a * x0 + s * noise, atol=1e-6)
    eps_ctx = _ctx(load_tiny("sd15"), ErasureConfig(concept="red"))
    assert torch.equal(eps_ctx.diffusion_target(x0, noise, t), noise)
