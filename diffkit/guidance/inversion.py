"""Pipeline method ``invert``: DDIM inversion of an image to the noise latent that regenerates it.

DDIM sampling with eta = 0 is a deterministic map from noise to image; running it backwards, with the
model evaluated at the latent one level below where it would be evaluated in sampling, recovers an
approximation of the noise (Song et al. 2021; Mokady et al. 2023). With two predictions from a guidance
object the step follows CFG++'s inversion (Chung et al., ICLR 2025; reference code
``InversionDDIMCFGpp``): walking t upward, with the latent z at the lower level ``a_prev`` and the model
evaluated at (z, t),

    x0 = (z - sqrt(1 - a_prev) eps_u) / sqrt(a_prev);      z <- sqrt(a_t) x0 + sqrt(1 - a_t) eps_lambda,

the exact algebraic inverse of the CFG++ sampling step. Plain DDIM inversion with CFG uses the guided
prediction in both places. ``pipe(prompt, latents=z, guidance=same, num_inference_steps=same)`` with a
``DDIMScheduler`` then reconstructs (or edits, with another prompt).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ..lifecycle import features_of
from ..noise import noise_level, to_epsilon
from .base import Guidance, StepContext
from .cfg import CFG
from .cfgpp import CFGPlusPlus

#: diffusers classes (by name; diffkit's keep the name) whose U-Net conditioning ``invert`` can build.
INVERTIBLE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def ddim_inversion_step(z: torch.Tensor, eps_renoise: torch.Tensor, eps: torch.Tensor, alpha_prod_prev,
                        alpha_prod_t) -> torch.Tensor:
    """One DDIM inversion step from level ``a_prev`` up to ``a_t`` (CFG++ inversion when the two eps differ).

    ``x0 = (z - sqrt(1 - a_prev) eps_renoise) / sqrt(a_prev)``; returns ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``.
    """
    x0 = (z - (1 - alpha_prod_prev) ** 0.5 * eps_renoise) / alpha_prod_prev**0.5
    return alpha_prod_t**0.5 * x0 + (1 - alpha_prod_t) ** 0.5 * eps


def _check_guidance(guidance) -> Guidance:
    if guidance is None:
        return CFG(1.0)
    if not isinstance(guidance, (CFG, CFGPlusPlus)):
        raise ValueError(
            f"invert supports guidance=None (conditional prediction only), CFG or CFGPlusPlus; "
            f"got {type(guidance).__name__}"
        )
    return guidance


class InversionMixin:
    """``pipe.invert(image, prompt, guidance=CFGPlusPlus(0.6))`` -> the noise latent (DDIM inversion)."""

    def _check_invertible(self) -> None:
        names = {cls.__name__ for cls in type(self).__mro__}
        if not names & set(INVERTIBLE):
            raise ValueError(
                f"invert is available on {', '.join(INVERTIBLE)} (diffkit's); {type(self).__name__} is not supported"
            )

    def _encode_image(self, image, height, width, generator) -> torch.Tensor:
        """The pipeline's own preprocessing and VAE encoder; latents scaled by ``vae.config.scaling_factor``."""
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        upcast = self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:  # SDXL's VAE overflows in float16; diffusers upcasts it the same way for decoding
            self.vae.to(torch.float32)
        try:
            pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
            dist = self.vae.encode(pixels).latent_dist
            latents = dist.mode() if generator is None else dist.sample(generator)
        finally:
            if upcast:
                self.vae.to(torch.float16)
        return latents.to(torch.float32) * self.vae.config.scaling_factor

    def _inversion_conditioning(self, prompts, negative_prompt, with_uncond: bool, height: int, width: int):
        """U-Net keyword arguments for the batch ``[uncond, cond]`` (or ``cond`` alone), as the pipeline builds them."""
        device = self._execution_device
        if hasattr(self, "text_encoder_2"):  # SDXL: two encoders, pooled embeddings and size conditioning
            embeds, neg, pooled, neg_pooled = self.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=with_uncond,
                negative_prompt=negative_prompt,
            )
            proj_dim = (self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
                        else int(pooled.shape[-1]))
            time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                              text_encoder_projection_dim=proj_dim)
            if with_uncond:
                embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
            time_ids = time_ids.to(device).repeat(embeds.shape[0], 1)
            return {"encoder_hidden_states": embeds,
                    "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids}}
        embeds, neg = self.encode_prompt(prompts, device, 1, with_uncond, negative_prompt)
        if with_uncond:
            embeds = torch.cat([neg, embeds])
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def invert(self, image, prompt, guidance: Guidance | None = None, num_inference_steps: int = 50,
               negative_prompt=None, generator: torch.Generator | None = None, height: int | None = None,
               width: int | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Return the noise latents from which DDIM sampling with ``guidance`` regenerates ``image``.

        Args:
            image: anything the pipeline's ``image_processor`` takes (PIL image(s), arrays or tensors in [0, 1]).
            prompt: the prompt (one, or one per image) the image is inverted under.
            guidance: ``None`` (conditional prediction only), ``CFG(s)`` (the guided eps in both places) or
                ``CFGPlusPlus(lambda)`` (x0 from eps_u, the move up with eps_lambda).
            num_inference_steps: the number of DDIM steps; reconstruct with the same number.
            negative_prompt: as in the pipeline call (the unconditional branch).
            generator: sample the VAE posterior with it; ``None`` uses the posterior mode (deterministic).
            height, width: resize the image to this size first (default: the image's size).
            latents: clean latents (already scaled by ``scaling_factor``) to invert instead of ``image``
                (which must then be ``None``), e.g. ``pipe(..., output_type="latent").images``.

        The steps use a ``DDIMScheduler`` built from ``pipe.scheduler.config`` (same noise schedule and
        timesteps as sampling with DDIM); the steps run in float32. Returns latents in the U-Net's dtype on the
        pipeline's device, ready for ``pipe(prompt, latents=...)``.
        """
        self._check_invertible()
        guidance = _check_guidance(guidance)
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        features_of(self).begin_call()  # the call owns per-call state (DeepCache's cache)
        if (image is None) == (latents is None):
            raise ValueError("pass exactly one of image and latents")
        if latents is not None:
            z = latents.to(device=self._execution_device, dtype=torch.float32)
        else:
            z = self._encode_image(image, height, width, generator)
        batch = z.shape[0]
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images; pass one prompt or one per image")
        pixel_h, pixel_w = (s * self.vae_scale_factor for s in z.shape[-2:])
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch
        with_uncond = guidance.needs_unconditional
        unet_kwargs = self._inversion_conditioning(prompts, negative_prompt, with_uncond, pixel_h, pixel_w)

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(int(num_inference_steps), device=z.device)
        prediction_type = scheduler.config.prediction_type
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.to(z.device)
        state: dict = {}
        with self.progress_bar(total=len(scheduler.timesteps)) as bar:
            for i, t in enumerate(scheduler.timesteps.flip(0)):
                model_in = torch.cat([z, z]) if with_uncond else z
                pred = self.unet(model_in.to(self.unet.dtype), t, return_dict=False, **unet_kwargs)[0].float()
                uncond, cond = pred.chunk(2) if with_uncond else (pred, pred)
                out = guidance(uncond, cond, StepContext(scheduler, t, z, prediction_type, i), state)
                level = noise_level(scheduler, t)  # the model's own timestep t, evaluated at z
                eps = to_epsilon(out.pred, z, level, prediction_type)
                renoise = out.pred if out.renoise_pred is None else out.renoise_pred
                eps_renoise = to_epsilon(renoise, z, level, prediction_type)
                prev_t = int(t) - ratio
                alpha_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.to(z.device)
                z = ddim_inversion_step(z, eps_renoise, eps, alpha_prev, alphas[int(t)])
                bar.update()
        return z.to(self.unet.dtype)  # the pipeline passes given latents to the U-Net without a cast
