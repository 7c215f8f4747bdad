"""DDIM inversion (pipe.invert) with CFG and CFG++ (Chung et al., ICLR 2025, inversion algorithm)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from diffkit.guidance import APG, CFG, CFGPlusPlus
from diffkit.guidance.inversion import ddim_inversion_step
from diffkit.guidance.steps import ddim_cfgpp_step

PROMPT = "a red star"


def _latent_psnr(a, b):
    """PSNR of latents with the peak taken as the reference latents' max |value|."""
    return float(10 * torch.log10(b.abs().max() ** 2 / ((a - b) ** 2).mean()))


def test_inversion_step_inverts_the_cfgpp_sampling_step():
    g = torch.Generator().manual_seed(0)
    x0, eps_u, eps_lam = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.8)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps_lam
    # sampling: x0 from eps_lambda at a_t, re-noise with eps_u to a_prev ...
    x0_lam = (x_t - (1 - a_t).sqrt() * eps_lam) / a_t.sqrt()
    x_prev = ddim_cfgpp_step(x0_lam, eps_u, a_prev)
    # ... inversion: x0 from eps_u at a_prev, up with eps_lambda to a_t: back to x_t.
    torch.testing.assert_close(ddim_inversion_step(x_prev, eps_u, eps_lam, a_prev, a_t), x_t, rtol=1e-5, atol=1e-5)


def _reference_inverse_loop(pipe, latents, steps, guidance):
    """Plain DDIM inversion with diffusers' own DDIMInverseScheduler (epsilon models)."""
    inverse = diffusers.DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    z = latents
    for t in inverse.timesteps:
        u, c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=embeds).sample.chunk(2)
        eps = u + guidance * (c - u)
        z = inverse.step(eps, t, z).prev_sample
    return z


def _reference_cfgpp_inverse_loop(pipe, latents, steps, lam):
    """The paper's CFG++ inversion written out: x0 with eps_u at a_prev, up to a_t with eps_lambda."""
    sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    ratio = 1000 // steps
    z = latents
    for t in reversed(sched.timesteps):
        u, c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=embeds).sample.chunk(2)
        eps_lam = u + lam * (c - u)
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[t - ratio] if t - ratio >= 0 else sched.final_alpha_cumprod
        x0 = (z - torch.sqrt(1 - a_prev) * u) / torch.sqrt(a_prev)
        z = torch.sqrt(a_t) * x0 + torch.sqrt(1 - a_t) * eps_lam
    return z


def _clean_latents(pipe, guidance, steps, seed):
    return pipe(PROMPT, guidance=guidance, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_cfg_inversion_equals_diffusers_inverse_scheduler(load_tiny):
    pipe = load_tiny("sd15")
    lat = _clean_latents(pipe, CFG(3.0), 5, 0)
    ours = pipe.invert(None, PROMPT, guidance=CFG(3.0), num_inference_steps=5, latents=lat)
    torch.testing.assert_close(ours, _reference_inverse_loop(pipe, lat, 5, 3.0), rtol=1e-5, atol=1e-5)


def test_cfgpp_inversion_equals_paper_algorithm(load_tiny):
    pipe = load_tiny("sd15")
    lat = _clean_latents(pipe, CFGPlusPlus(0.6), 5, 1)
    ours = pipe.invert(None, PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=5, latents=lat)
    torch.testing.assert_close(ours, _reference_cfgpp_inverse_loop(pipe, lat, 5, 0.6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_invert_then_reconstruct(load_tiny, family):
    """The round trip's error shrinks with the number of steps; CFG++ 0.6 and CFG 7.5 both reconstruct."""
    pipe = load_tiny(family)
    psnrs = {}
    for name, guidance in (("cfgpp", CFGPlusPlus(0.6)), ("cfg", CFG(7.5))):
        for steps in (4, 12):
            lat = _clean_latents(pipe, guidance, steps, 2)
            z = pipe.invert(None, PROMPT, guidance=guidance, num_inference_steps=steps, latents=lat)
            assert z.shape == lat.shape and abs(float(z.std()) - 1.0) < 0.25  # noise-like
            rec = pipe(PROMPT, latents=z, guidance=guidance, num_inference_steps=steps, output_type="latent").images
            psnrs[name, steps] = _latent_psnr(rec, lat)
    print(family, {k: round(v, 2) for k, v in psnrs.items()})
    for name in ("cfgpp", "cfg"):
        assert psnrs[name, 12] > psnrs[name, 4] + 3.0 and psnrs[name, 12] > 25.0


def test_invert_from_image_uses_vae_and_is_deterministic(load_tiny):
    pipe = load_tiny("sd15")
    image = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    z1 = pipe.invert(image, PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=4)
    z2 = pipe.invert([image, image], [PROMPT, PROMPT], guidance=CFGPlusPlus(0.6), num_inference_steps=4)
    assert z1.shape == (1, 4, 8, 8) and z2.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z2[0:1], z1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z2[1:2], z1, rtol=1e-4, atol=1e-4)
    # The encoded latents are the VAE posterior mode times scaling_factor.
    pixels = pipe.image_processor.preprocess(image)
    encoded = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    from_latents = pipe.invert(None, PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=4, latents=encoded)
    torch.testing.assert_close(from_latents, z1)
    sampled = pipe.invert(image, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, pipe.invert(image, PROMPT, num_inference_steps=4))


def test_invert_negative_prompt_is_the_unconditional_branch(load_tiny):
    pipe = load_tiny("sd15")
    lat = _clean_latents(pipe, CFG(1.0), 3, 3)
    a = pipe.invert(None, PROMPT, guidance=CFGPlusPlus(0.0), negative_prompt="a blue circle", num_inference_steps=3,
                    latents=lat)
    b = pipe.invert(None, "a blue circle", guidance=None, num_inference_steps=3, latents=lat)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_invert_bad_inputs(load_tiny):
    pipe = load_tiny("sd15")
    lat = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="invert supports guidance=None .*CFG or CFGPlusPlus; got APG"):
        pipe.invert(None, PROMPT, guidance=APG(5.0), latents=lat)
    with pytest.raises(ValueError, match="pass exactly one of image and latents"):
        pipe.invert(None, PROMPT)
    with pytest.raises(ValueError, match="got 2 prompts for 1 images"):
        pipe.invert(None, [PROMPT, PROMPT], latents=lat)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        pipe.invert(None, PROMPT, latents=lat, num_inference_steps=0)


def test_invert_unsupported_pipeline_class(load_tiny):
    from diffkit.pipelines.classes import PIPELINES

    pipe = load_tiny("sd15")
    img2img = PIPELINES["StableDiffusionImg2ImgPipeline"](**pipe.components)
    with pytest.raises(ValueError, match="invert is available on StableDiffusionPipeline, StableDiffusionXLPipeline"
                                         " \\(diffkit's\\); StableDiffusionImg2ImgPipeline is not supported"):
        img2img.invert(None, PROMPT, latents=torch.zeros(1, 4, 8, 8))


def test_half_precision_pipeline_round_trip(load_tiny):
    """Inverted latents come back in the U-Net's dtype, so ``pipe(latents=...)`` takes them as they are."""
    pipe = load_tiny("sd15").to(torch.bfloat16)
    image = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    z = pipe.invert(image, PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=3)
    assert z.dtype == torch.bfloat16
    rec = pipe(PROMPT, latents=z, guidance=CFGPlusPlus(0.6), num_inference_steps=3, output_type="latent").images
    assert rec.dtype == torch.bfloat16 and torch.isfinite(rec.float()).all()
