"""The denoising trajectory as a chain of pure steps ``z_{i+1} = step(z_i, i)``, like the real pipeline.

``capture_conditioning`` runs the pipeline's own ``__call__`` up to its first U-Net evaluation and keeps
the U-Net's keyword arguments (prompt embeddings for ``[uncond, cond]``, SDXL's pooled embeddings and
size ids), so conditioning is exactly diffusers'. ``Sampler.step`` then repeats one iteration of the
pipeline loop: batch of two (classifier-free guidance), ``scale_model_input``, U-Net,
``u + s (c - u)``, ``scheduler.step``.

Only single-step schedulers are accepted: the checkpointed reverse walk recomputes step i from the
stored latent z_i alone, which is exact only when the step does not read a history of earlier model
outputs (DPM-Solver++ multistep, UniPC, DEIS, PNDM, LMS) or evaluate the model twice (Heun, KDPM2).
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch

#: Schedulers whose step is a function of (model output, t, z_t) and optional fresh noise.
SINGLE_STEP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (prompt, optimizer step, denoising step...)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_scheduler(scheduler) -> None:
    name = type(scheduler).__name__
    if name not in SINGLE_STEP_SCHEDULERS:
        raise ValueError(
            f"mask learning needs a single-step scheduler, got {name}: the checkpointed reverse walk recomputes "
            f"each step from its stored input latent, which is wrong for schedulers with a history of model "
            f"outputs (multistep) or two evaluations per step. Use one of {', '.join(SINGLE_STEP_SCHEDULERS)}, "
            f"e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )


@dataclass
class Conditioning:
    """The U-Net keyword arguments of one prompt (CFG batch ``[uncond, cond]``) and its latent shape."""

    unet_kwargs: dict
    latent_shape: tuple[int, ...]
    cfg: bool


class _Captured(Exception):
    pass


def _cast(obj, dtype):
    """Floating tensors (nested in dicts) to ``dtype``: text encoders may be stored in another precision."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _detach(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def capture_conditioning(pipe, prompt: str, guidance_scale: float, height=None, width=None,
                         negative_prompt=None) -> Conditioning:
    """Run ``pipe``'s own call until its first U-Net evaluation and keep the U-Net's inputs."""
    box = {}

    def grab(_module, args, kwargs):
        box["sample"] = args[0] if args else kwargs["sample"]
        box["kwargs"] = {k: _detach(v) for k, v in kwargs.items() if k not in ("sample", "timestep", "return_dict")}
        raise _Captured

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=1, guidance_scale=guidance_scale,
             height=height, width=width, output_type="latent")
    except _Captured:
        pass
    finally:
        handle.remove()
    if "sample" not in box:
        raise RuntimeError("the pipeline finished without evaluating its U-Net")
    cfg = guidance_scale > 1.0
    shape = tuple(box["sample"].shape)
    return Conditioning(box["kwargs"], (shape[0] // 2 if cfg else shape[0], *shape[1:]), cfg)


class Sampler:
    """One denoising step at a time, with per-step seeded noise for stochastic schedulers."""

    def __init__(self, unet, scheduler, num_steps: int, guidance_scale: float, device, eta: float = 0.0,
                 autocast=None):
        check_scheduler(scheduler)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.unet = unet
        # A private scheduler instance: the pipeline's own keeps its timesteps and state.
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = list(self.scheduler.timesteps)
        self.num_steps = len(self.timesteps)
        self.guidance_scale = float(guidance_scale)
        self.device = torch.device(device)
        self.autocast = autocast or nullcontext
        params = inspect.signature(self.scheduler.step).parameters
        self._takes_generator = "generator" in params
        self._takes_eta = "eta" in params
        self.eta = eta

    def initial_latent(self, shape, seed: int, dtype=torch.float32) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed_for(seed, -1))
        z = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device, dtype)
        return z * self.scheduler.init_noise_sigma

    def _at(self, i: int) -> None:
        # Euler-type schedulers index their sigmas by an internal step counter; set it explicitly so a
        # step can be recomputed out of order (the reverse walk).
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = i

    def step(self, z: torch.Tensor, i: int, cond: Conditioning, seed: int) -> torch.Tensor:
        t = self.timesteps[i]
        self._at(i)
        x = torch.cat([z, z]) if cond.cfg else z
        x = self.scheduler.scale_model_input(x, t)
        with self.autocast():
            dtype = self.unet.dtype
            out = self.unet(x.to(dtype), t, **_cast(cond.unet_kwargs, dtype), return_dict=False)[0]
        out = out.to(z.dtype)
        if cond.cfg:
            uncond, c = out.chunk(2)
            out = uncond + self.guidance_scale * (c - uncond)
        kw = {}
        if self._takes_generator:
            kw["generator"] = torch.Generator("cpu").manual_seed(seed_for(seed, i, -2))
        if self._takes_eta:
            kw["eta"] = self.eta
        self._at(i)
        return self.scheduler.step(out, t, z, return_dict=False, **kw)[0]


def run_trajectory(step_fn, z0: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """``[z_0, ..., z_T]`` without gradients (every step's input kept for the reverse walk)."""
    latents = [z0.detach()]
    with torch.no_grad():
        for i in range(num_steps):
            latents.append(step_fn(latents[-1], i).detach())
    return latents


def reverse_walk(step_fn, latents: list[torch.Tensor], grad_final: torch.Tensor, params: list[torch.Tensor]):
    """Time-step gradient checkpointing (EcoDiff): d loss / d params from the stored latents.

    From the last step back: recompute ``z_{i+1} = step(z_i, i)`` with gradients from the stored z_i,
    add ``(d z_{i+1} / d params)^T g`` to the parameter gradients and carry ``g <- (d z_{i+1} / d z_i)^T g``.
    Activation memory is one step's. ``step_fn`` must be deterministic given (z_i, i) (seeded noise).
    """
    grads = [torch.zeros_like(p) for p in params]
    g = grad_final
    for i in reversed(range(len(latents) - 1)):
        z_in = latents[i].detach().requires_grad_(i > 0)
        with torch.enable_grad():
            z_out = step_fn(z_in, i)
            inputs = [*params, z_in] if i > 0 else list(params)
            res = torch.autograd.grad(z_out, inputs, grad_outputs=g, allow_unused=True)
        for acc, r in zip(grads, res[: len(params)]):
            if r is not None:
                acc += r
        if i > 0:
            g = res[-1] if res[-1] is not None else torch.zeros_like(z_in)
        del z_out, res
    return grads
