"""ESD — Erasing Concepts from Diffusion Models (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023).

The fine-tuned model's prediction for the concept c is pulled to the frozen model's prediction guided
*away* from c (paper eq. 2, negative guidance):

    eps_theta(x_t, c, t)  <-  eps_orig(x_t, t) - eta (eps_orig(x_t, c, t) - eps_orig(x_t, t))

with x_t produced by the frozen model sampling from c (DDIM with guidance, stopped at a random step).
Our ``anchor`` generalises the first term to eps_orig(x_t, anchor, t); the default anchor "" is the
paper's equation exactly. The equation is affine in the prediction with coefficients summing to 1, so
it holds unchanged for v-prediction models (v is affine in eps at fixed x_t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .method import ErasureMethod, MethodConfig, register_method


@dataclass(frozen=True)
class ESDConfig(MethodConfig):
    """ESD's options. eta: the negative-guidance strength of eq. 2 (1 in the reference code; the job's
    top-level ``eta``, validated there). ESD has no ``options:`` keys."""

    job_fields = ("eta",)

    eta: float = 1.0


def esd_target(pred_concept: torch.Tensor, pred_uncond: torch.Tensor, pred_anchor: torch.Tensor,
               eta: float) -> torch.Tensor:
    """ESD's training target: pred_anchor - eta (pred_concept - pred_uncond) (paper eq. 2, anchor "" = uncond)."""
    return pred_anchor - eta * (pred_concept - pred_uncond)


def esd_batch(ctx, cfg, eta: float):
    """Draw one ESD batch: concept prompts, x_t sampled by the frozen model, and the negative-guidance target.

    Returns ``(prompts, x_t, t, pred_concept, target)``; the frozen model's concept prediction is returned
    too because adversarial methods (AdvUnlearn) attack towards it. Draws come from the shared RNG for the
    global batch, then this process takes its slice: identical for any process count.
    """
    n = cfg.batch_size
    which = ctx.local(ctx.randint(n, len(cfg.concept)))
    stop = ctx.local(ctx.randint(n, cfg.sample_steps))
    noise = ctx.local(ctx.randn(n))
    prompts = [cfg.concept[i] for i in which.tolist()]
    b = len(prompts)
    x_t, t = ctx.sample(prompts, stop, noise)
    with torch.no_grad():
        conds = prompts + [""] * b + ([cfg.anchor] * b if cfg.anchor else [])
        reps = len(conds) // b
        preds = ctx.predict(x_t.repeat(reps, 1, 1, 1), t.repeat(reps), ctx.embed(conds, original=True),
                            original=True).chunk(reps)
        pred_c, pred_u = preds[0], preds[1]
        target = esd_target(pred_c, pred_u, preds[2] if cfg.anchor else pred_u, eta)
    return prompts, x_t, t, pred_c, target


@register_method
class ESD(ErasureMethod):
    """ESD-x (``parameters: esd-x``, cross-attention, default) or ESD-u (``esd-u``); eta = ``cfg.eta``."""

    name = "esd"
    config_class = ESDConfig
    defaults = {"parameters": "esd-x", "lr": 1e-5, "batch_size": 1}
    supports_sdxl = True

    def loss(self, ctx):
        prompts, x_t, t, _, target = esd_batch(ctx, self.config, self.cfg.eta)
        pred = ctx.predict(x_t, t, ctx.embed(prompts))
        loss = F.mse_loss(pred, target)
        return loss, {"esd_loss": float(loss.detach())}
