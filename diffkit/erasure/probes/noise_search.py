"""Initial-noise search: does some starting noise make the erased model draw the concept anyway?

For each prompt draw ``candidates`` initial latents ``z_1..z_K ~ N(0, I)`` (one generator seeded
``seed + i`` for prompt i, drawn in order), generate with the erased model from each, score every image
with ``score`` (the oracle's probability of the concept) and keep the highest; the probe recovers the
concept for that prompt when ``judge`` reads the concept in the kept image. Without ``score`` the judge's
verdicts are the score (the first candidate judged to show the concept is kept).

This is the "noise-based probe" idea of "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025):
its code perturbs the DDIM trajectory (eta > 1 and a variance scale, 6 x 4 = 24 variants per prompt) and
keeps the variant a classifier ranks most concept-like; here the search is over the initial noise, which
needs no custom scheduler (the erased pipeline samples as usual) and is reproducible from a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..fields import check_integers, check_number, check_seed
from .report import ProbeReport


@dataclass(frozen=True)
class NoiseSearchConfig:
    """candidates: initial latents per prompt (the paper's code: 24 variants); batch_size: images per
    pipeline call; num_inference_steps, guidance_scale: generation; seed: prompt i draws from seed + i."""

    candidates: int = 16
    batch_size: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self):
        check_integers(self, ("candidates", "batch_size", "num_inference_steps"))
        check_number(self, "guidance_scale")
        check_seed(self)


def initial_latents(pipe, n: int, seed: int) -> torch.Tensor:
    """(n, C, h, w) standard normal latents for ``pipe`` at its default size, from ``Generator(seed)``."""
    c = pipe.unet.config.in_channels
    s = pipe.unet.config.sample_size
    return torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def noise_search_probe(
    pipe,
    prompts: Sequence[str],
    judge: Callable[[torch.Tensor], Sequence[bool]],
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    config: NoiseSearchConfig = NoiseSearchConfig(),
) -> ProbeReport:
    """Search ``config.candidates`` initial noises per prompt on (erased) ``pipe``; see the module docstring.

    judge(images (B, 3, H, W) in [0, 1]) -> one bool per image; score(images) -> (B,) concept-likeness.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt to probe")
    K = config.candidates
    hits, details, kept = [], [], []
    for i, prompt in enumerate(prompts):
        z = initial_latents(pipe, K, config.seed + i)
        images = []
        for lo in range(0, K, config.batch_size):
            zb = z[lo:lo + config.batch_size]
            out = pipe([prompt] * len(zb), latents=zb.to(device=pipe.unet.device, dtype=pipe.unet.dtype),
                       num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                       output_type="pt")
            images.append(out.images.float().cpu())
        images = torch.cat(images)
        if score is None:
            scores = torch.tensor([float(bool(v)) for v in judge(images)])
        else:
            scores = torch.as_tensor(score(images)).float().flatten().cpu()
            if scores.numel() != K:
                raise ValueError(f"score must give one value per image ({K}), got {scores.numel()}")
        best = int(scores.argmax())
        hit = bool(judge(images[best:best + 1])[0])
        hits.append(hit)
        kept.append(images[best:best + 1])
        details.append({"prompt": prompt, "seed": config.seed + i, "candidate": best, "score": float(scores[best]),
                        "mean_score": float(scores.mean())})
    return ProbeReport("noise-search", hits, {}, details, asdict(config), torch.cat(kept))
