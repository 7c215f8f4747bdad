"""APG and CFG++ composed with the pipeline's own features: negative prompts, several images per prompt,
step-end callbacks, SDXL, and the guidance_scale / guidance= agreement check."""

from __future__ import annotations

import diffusers
import pytest
import torch

from diffkit.guidance import APG, CFG, CFGPlusPlus

PROMPT = "a red star"
KW = dict(num_inference_steps=4, output_type="latent")


@pytest.mark.parametrize("guidance", [APG(9.0), CFGPlusPlus(0.0)], ids=["apg", "cfgpp"])
def test_negative_prompt_is_the_unconditional_branch(load_tiny, gen, guidance):
    pipe = load_tiny("sd15")
    with_neg = pipe(PROMPT, negative_prompt="a blue circle", guidance=guidance, generator=gen(0), **KW).images
    without = pipe(PROMPT, guidance=guidance, generator=gen(0), **KW).images
    assert not torch.allclose(with_neg, without)
    if isinstance(guidance, CFGPlusPlus):  # lambda = 0: sampling from the negative prompt alone
        neg_only = pipe("a blue circle", guidance_scale=1.0, generator=gen(0), **KW).images
        torch.testing.assert_close(with_neg, neg_only, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [APG(12.0, norm_threshold=2.0), CFGPlusPlus(0.8)], ids=["apg", "cfgpp"])
def test_batch_is_per_sample(load_tiny, guidance):
    """num_images_per_prompt > 1 with two prompts: each image equals its own single run (norms are per sample)."""
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    prompts = [PROMPT, "a blue circle"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = pipe(prompts, num_images_per_prompt=2, latents=latents, guidance=guidance,
                 generator=torch.Generator().manual_seed(2), **KW).images
    assert batch.shape == (4, 4, 8, 8)
    # Deterministic DDIM: every image equals its own single run (APG's norms never mix samples).
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    batch = pipe(prompts, num_images_per_prompt=2, latents=latents, guidance=guidance, **KW).images
    for k in range(4):
        single = pipe(prompts[k // 2], latents=latents[k:k + 1], guidance=guidance, **KW).images
        torch.testing.assert_close(batch[k:k + 1], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [APG(9.0), CFGPlusPlus(0.6)], ids=["apg", "cfgpp"])
def test_callback_on_step_end_sees_guided_latents(load_tiny, gen, guidance):
    pipe = load_tiny("sd15")
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].clone()))
        return {}

    out = pipe(PROMPT, guidance=guidance, generator=gen(4), callback_on_step_end=callback, **KW).images
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    torch.testing.assert_close(seen[-1][2], out)


def test_callback_can_change_latents(load_tiny, gen):
    pipe = load_tiny("sd15")
    zero_after_first = lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])} if i == 0 else {}  # noqa: E731
    a = pipe(PROMPT, guidance=CFGPlusPlus(0.6), generator=gen(0), callback_on_step_end=zero_after_first,
             callback_on_step_end_tensor_inputs=["latents"], **KW).images
    b = pipe(PROMPT, guidance=CFGPlusPlus(0.6), generator=gen(9), callback_on_step_end=zero_after_first,
             callback_on_step_end_tensor_inputs=["latents"], **KW).images
    torch.testing.assert_close(a, b)  # after step 0 the seed no longer matters


def test_guidance_scale_must_agree(load_tiny):
    pipe = load_tiny("sd15")
    with pytest.raises(ValueError, match="guidance_scale=7.5 disagrees with guidance=APG\\(scale=15.0"):
        pipe(PROMPT, guidance=APG(15.0), guidance_scale=7.5, **KW)
    with pytest.raises(ValueError, match="guidance_scale=7.5 disagrees with guidance=CFGPlusPlus\\(scale=0.6\\)"):
        pipe(PROMPT, guidance=CFGPlusPlus(0.6), guidance_scale=7.5, **KW)
    agreed = pipe(PROMPT, guidance=APG(15.0), guidance_scale=15.0, generator=torch.Generator().manual_seed(0), **KW)
    alone = pipe(PROMPT, guidance=APG(15.0), generator=torch.Generator().manual_seed(0), **KW)
    assert torch.equal(agreed.images, alone.images)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_sdxl(load_tiny, gen, scheduler):
    pipe = load_tiny("sdxl")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    cfg = pipe(PROMPT, guidance=CFG(6.0), generator=gen(0), **KW).images
    apg = pipe(PROMPT, guidance=APG(6.0, eta=1.0, norm_threshold=0.0, momentum=0.0), generator=gen(0), **KW).images
    torch.testing.assert_close(apg, cfg, rtol=1e-4, atol=1e-4)
    lam0 = pipe(PROMPT, guidance=CFGPlusPlus(0.0), generator=gen(0), **KW).images
    lam1 = pipe(PROMPT, guidance=CFGPlusPlus(1.0), generator=gen(0), **KW).images
    assert lam0.shape == lam1.shape == (1, 4, 8, 8) and not torch.allclose(lam0, lam1)
    assert torch.isfinite(lam1).all()


def test_guidance_of_wrong_type(load_tiny):
    pipe = load_tiny("sd15")
    with pytest.raises(TypeError, match="guidance must be a diffkit.guidance object"):
        pipe(PROMPT, guidance=7.5, **KW)


@pytest.mark.parametrize("guidance", [APG(9.0, norm_threshold=2.0), CFGPlusPlus(0.6)], ids=["apg", "cfgpp"])
def test_deepcache(load_tiny, gen, guidance):
    """DeepCache's U-Net hook and the guidance hook compose: interval 1 changes nothing, interval 3 runs the
    mid block on 2 of 6 steps, and disabling restores the uncached latents bit for bit."""
    pipe = load_tiny("sd15")
    kw = dict(num_inference_steps=6, output_type="latent", guidance=guidance)
    plain = pipe(PROMPT, generator=gen(0), **kw).images
    pipe.enable_deepcache(interval=1, branch=0)
    torch.testing.assert_close(pipe(PROMPT, generator=gen(0), **kw).images, plain, rtol=1e-5, atol=1e-5)
    pipe.enable_deepcache(interval=3, branch=0)
    full = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda *a: full.append(1))
    cached = pipe(PROMPT, generator=gen(0), **kw).images
    handle.remove()
    assert len(full) == 2 and torch.isfinite(cached).all() and not torch.equal(cached, plain)
    pipe.disable_deepcache()
    assert torch.equal(pipe(PROMPT, generator=gen(0), **kw).images, plain)


def test_apg_denoised_space_needs_a_supported_scheduler(load_tiny, gen):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.KDPM2DiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler is not supported for converting predictions; "
                                         "supported schedulers: DDIMScheduler, DDPMScheduler, DEISMultistepScheduler"):
        pipe(PROMPT, guidance=APG(9.0), **KW)
    # The epsilon-space rule needs no conversion: it runs on any scheduler.
    out = pipe(PROMPT, guidance=APG(9.0, space="epsilon"), generator=gen(0), **KW).images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
