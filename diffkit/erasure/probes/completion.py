"""Diffusion completion (and inpainting) from a partly noised image of the concept.

A concept image ``x_0`` (latents made by the original model) is noised to the timestep a fraction
``strength`` of the way up the sampling schedule, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
(``diffkit.noise.add_noise``), and the erased model completes the remaining DDIM steps under a neutral
prompt (default "") with classifier-free guidance. With a ``mask`` (1 = regenerate) only that region is
generated: after every step the rest is reset to ``x_0`` noised to the new level (inpainting by
replacement), so the erased model sees the concept's surroundings as visual context. The probe recovers
the concept for an image when the oracle reads the concept in its completion at any strength tried.

"When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025) probes with the same visual context: its
diffusion-completion probe lets the original model take the first steps from the concept prompt and the
erased model finish them, and its inpainting probe inpaints a central square of an original-model concept
image. Here the context is an explicit noise level (``strength`` 1 is generation from pure noise), a neutral
prompt so that no word of the concept is given, and the same DDIM schedule the engine samples with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ...noise import add_noise, training_level
from ..conditioning import concat, prompt_encoder, unet_kwargs
from ..fields import check_integers, check_number, check_seed
from ..sampling import cfg, ddim_scheduler
from .report import ProbeReport


@dataclass(frozen=True)
class CompletionConfig:
    """strengths: fractions of the schedule re-noised (img2img's ``strength``; 1 = pure noise); prompt:
    the neutral prompt the erased model completes under; num_inference_steps: DDIM steps of the full
    schedule; guidance_scale; seed: the noise of image i is drawn from seed + i."""

    strengths: tuple[float, ...] = (0.5, 0.75)
    prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self):
        s = tuple(self.strengths)
        object.__setattr__(self, "strengths", s)
        if not s or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in s):
            raise ValueError(f"strengths must be a non-empty sequence of values in (0, 1], got {self.strengths!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {self.prompt!r}")
        check_integers(self, ("num_inference_steps",))
        check_number(self, "guidance_scale")
        check_seed(self)


@torch.no_grad()
def complete_from(
    pipe,
    x0: torch.Tensor,
    noise: torch.Tensor,
    strength: float,
    *,
    prompt: str = "",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    mask: torch.Tensor | None = None,
    output_type: str = "pt",
) -> torch.Tensor:
    """Noise ``x0`` (B, C, h, w) with ``noise`` to ``strength`` and complete it with ``pipe``'s U-Net (DDIM,
    CFG ``guidance_scale``, ``prompt`` against ""). ``mask`` (1 or B, 1, h, w): 1 where the model generates,
    0 where ``x0`` is kept (noised to each step's level). Returns images (B, 3, H, W) in [0, 1] on CPU, or the
    final latents with ``output_type="latent"``."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    sched = ddim_scheduler(pipe.scheduler.config, num_inference_steps)
    steps = len(sched.timesteps)
    start = steps - min(int(steps * strength), steps)  # diffusers' img2img rule
    timesteps = sched.timesteps[start:]
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    x0 = x0.to(device=device, dtype=torch.float32)
    noise = noise.to(x0)
    b = x0.shape[0]
    factor = getattr(pipe, "vae_scale_factor", 8)
    encoder = prompt_encoder(pipe, pipe.text_encoder.device, cache=False,
                             image_size=(x0.shape[-2] * factor, x0.shape[-1] * factor))
    emb = concat([encoder.encode([""] * b), encoder.encode([prompt] * b)]).to(dtype)
    alphas = sched.alphas_cumprod
    x = add_noise(x0, noise, training_level(alphas, timesteps[:1].expand(b))) if len(timesteps) else x0.clone()
    if mask is not None:
        mask = mask.to(x0)
    for i, t in enumerate(timesteps):
        tt = torch.full((2 * b,), int(t), device=device, dtype=torch.long)
        pred_u, pred_c = unet(torch.cat([x, x]).to(dtype), tt, **unet_kwargs(emb)).sample.float().chunk(2)
        x = sched.step(cfg(pred_u, pred_c, guidance_scale), t, x).prev_sample
        if mask is not None:
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else None
            known = x0 if nxt is None else add_noise(x0, noise, training_level(alphas, nxt.reshape(1).expand(b)))
            x = mask * x + (1 - mask) * known
    if output_type == "latent":
        return x
    vae = pipe.vae
    decoded = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pt").float().cpu()


def completion_probe(
    pipe,
    concept_latents: torch.Tensor,
    judge: Callable[[torch.Tensor], Sequence[bool]],
    config: CompletionConfig = CompletionConfig(),
    *,
    mask: torch.Tensor | None = None,
) -> ProbeReport:
    """Complete every concept image (latents (N, C, h, w) from the original model) at every strength with
    (erased) ``pipe``; hit for an image when any strength's completion is judged to show the concept."""
    n = concept_latents.shape[0]
    if n == 0:
        raise ValueError("concept_latents must hold at least one latent to probe")
    shape = concept_latents.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(config.seed + i))
                         for i in range(n)])
    levels, images = {}, {}
    for s in config.strengths:
        imgs = complete_from(pipe, concept_latents, noise, s, prompt=config.prompt,
                             num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                             mask=mask)
        levels[f"{s:g}"] = [bool(v) for v in judge(imgs)]
        images[f"{s:g}"] = imgs
    hits = [any(levels[key][i] for key in levels) for i in range(n)]
    # the judged image of each item: its first recovering strength, else the strongest
    kept, details = [], []
    for i in range(n):
        key = next((key for key in levels if levels[key][i]), list(levels)[-1])
        kept.append(images[key][i:i + 1])
        details.append({"seed": config.seed + i, "strength": float(key), "recovered": hits[i]})
    settings = {**asdict(config), "strengths": list(config.strengths), "masked": mask is not None}
    return ProbeReport("completion", hits, levels, details, settings, torch.cat(kept))
