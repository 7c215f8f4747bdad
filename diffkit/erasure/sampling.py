"""Latents drawn from the original model: ESD's x_t and SalUn's forget / retain images.

ESD (reference code) runs the frozen model's DDIM sampler with classifier-free guidance from pure
noise for a random number k of its ``sample_steps`` steps and trains at the timestep reached,
``timesteps[k]``; k = ``sample_steps`` gives finished (clean) latents, which SalUn uses as images.
Each batch element has its own k: the batch is stepped together and each element's latent is taken
when its own k is reached, so one trajectory serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from .conditioning import concat


def ddim_scheduler(config, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule, set to ``steps`` inference steps."""
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    return sched


def cfg(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: u + s (c - u)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


@torch.no_grad()
def sample_until(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    cond,
    uncond,
    stop: torch.Tensor,
    guidance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM with guidance ``guidance`` until each element i has taken ``stop[i]`` steps.

    predict(latents, timesteps (B,), conditioning) -> model output; ``cond`` / ``uncond``: conditionings of
    ``diffkit.erasure.conditioning`` (a tensor, or SDXL's ``XLConditioning``). Returns (x, t): the latents and
    the timestep they sit at (``timesteps[stop]``; for stop == len(timesteps), 0 and clean latents).
    """
    timesteps = scheduler.timesteps
    n = len(timesteps)
    stop = stop.to("cpu").long()
    if stop.numel() != noise.shape[0] or int(stop.min()) < 0 or int(stop.max()) > n:
        raise ValueError(f"stop indices must be in [0, {n}] with one per latent, got {stop.tolist()}")
    x = noise * scheduler.init_noise_sigma
    out = x.clone()
    emb = concat([uncond, cond])
    for i in range(int(stop.max())):
        t = timesteps[i]
        tt = torch.full((2 * x.shape[0],), int(t), device=x.device, dtype=torch.long)
        pred_u, pred_c = predict(torch.cat([x, x]), tt, emb).chunk(2)
        x = scheduler.step(cfg(pred_u, pred_c, guidance), t, x).prev_sample
        done = (stop == i + 1).to(x.device)
        out[done] = x[done]
    ts = torch.cat([timesteps.cpu(), torch.zeros(1, dtype=timesteps.dtype)])[stop]
    return out, ts.to(device=noise.device, dtype=torch.long)
