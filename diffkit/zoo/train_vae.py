"""Train the reference model's ``AutoencoderKL`` on shapes-world renders (step 1 of 2).

A 4x-downsampling VAE (64x64x3 <-> 4x16x16; SD's is 8x) keeps stripes, dots and checks, which an 8x
latent of a 64-pixel image blurs. No mid-block attention, so the network is fully convolutional and
trains on 32x32 crops (4x cheaper per sample) yet runs on whole 64x64 images. Loss: MSE + an L1 on
image gradients (sharp edges) + a small KL, as in SD's VAE minus the GAN term.

    python -m diffkit.zoo.train_vae --out runs/vae [--steps 1200] [--device cpu]

Checkpoints (safetensors + JSON, atomic) every ``--save-every`` steps; rerunning resumes. Each step's
data and noise come from generators seeded by (seed, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from .checkpointing import atomic_write_json, load_checkpoint, save_checkpoint
from .shapes import is_heldout, render, sample_spec

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    # 8 latent channels (SD has 4): at 4x downsampling, a 4x4 patch of stripes, dots or checks is 48
    # values, more than 4 numbers can carry; the U-Net's cost barely depends on it
    latent_channels=8,
    # One group: GroupNorm over all channels keeps their ratios. With several groups each is rescaled
    # on its own per image, which erases hue (the ratio of channel groups) on these mostly-background
    # images; the VAE then learned only luminance in its first hundreds of steps.
    norm_num_groups=1,
    sample_size=64,
    mid_block_add_attention=False,
)


#: Initial log-variance of the posterior. At the default (0) the latent noise has std 1 and drowns
#: the signal of a fresh encoder, so the decoder first learns to output an average (grey) object;
#: starting near-deterministic lets colors and patterns through from the first steps.
INIT_LOGVAR = -8.0


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        c = VAE_CONFIG["latent_channels"]
        vae.quant_conv.weight[c:] *= 0.01
        vae.quant_conv.bias[c:] = INIT_LOGVAR
    return vae


def training_specs(rng: np.random.Generator, n: int, **pose) -> list:
    """``n`` random specs, none of a held-out (object, color, style) combination; ``pose`` goes to
    ``sample_spec`` (``rotation_range``, ``center_range``)."""
    out = []
    while len(out) < n:
        spec = sample_spec(rng, **pose)
        if not is_heldout(spec):
            out.append(spec)
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 -> float Nx3xHxW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _batch(seed: int, step: int, batch: int, crop: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, step])
    imgs = np.stack([render(s) for s in training_specs(rng, batch)])
    x = to_tensor(imgs)
    if crop < x.shape[-1]:
        i, j = rng.integers(0, x.shape[-1] - crop + 1, size=2)
        x = x[..., i : i + crop, j : j + crop]
    return x


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, kl_weight: float, grad_weight: float,
             lowpass_weight: float):
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    y = vae.decode(z).sample
    mse = F.mse_loss(y, x)
    # the low-pass term weighs flat regions' colour; luminance edges dominate a plain pixel loss early on
    lowpass = F.mse_loss(F.avg_pool2d(y, 4), F.avg_pool2d(x, 4))
    kl = post.kl().mean() / z[0].numel()
    loss = mse + lowpass_weight * lowpass + grad_weight * gradient_l1(y, x) + kl_weight * kl
    return loss, mse


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int, n: int = 512) -> float:
    """1 / std of the latent means of ``n`` renders (SD's ``scaling_factor``: unit-variance latents)."""
    rng = np.random.default_rng([seed, 10**9])
    x = to_tensor(np.stack([render(s) for s in training_specs(rng, n)]))
    z = torch.cat([vae.encode(x[i : i + 128]).latent_dist.mean for i in range(0, n, 128)])
    return float(1.0 / z.std())


def train_vae(
    out: Path,
    steps: int = 1200,
    batch: int = 32,
    crop: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    kl_weight: float = 1e-6,
    grad_weight: float = 0.1,
    lowpass_weight: float = 2.0,
    save_every: int = 100,
    device: str = "cpu",
    stop_at: int | None = None,
) -> AutoencoderKL:
    """Train (or resume) in ``out``; return the trained VAE, saved in ``out/vae``.

    ``stop_at`` ends the run after that step (checkpointed) and exports the VAE as it is then; rerunning
    with a later ``stop_at`` (or none) resumes the same schedule.
    """
    out = Path(out)
    ckpt = out / "vae_checkpoint"
    vae = build_vae(seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    def lr_lambda(s: int) -> float:  # 50 warm-up steps, then cosine down to 5%
        return min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))

    meta = load_checkpoint(ckpt, {"vae": vae}, opt)
    start = meta["step"] if meta else 0
    elapsed = meta.get("train_seconds", 0.0) if meta else 0.0
    t0 = time.time()
    end = steps if stop_at is None else min(stop_at, steps)
    bar = tqdm(range(start, end), initial=start, total=steps, desc="vae")
    for step in bar:
        for group in opt.param_groups:  # the schedule is a pure function of the step, so resuming is exact
            group["lr"] = lr * lr_lambda(step)
        x = _batch(seed, step, batch, crop).to(device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss, mse = vae_loss(vae, x, gen, kl_weight, grad_weight, lowpass_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == end:
            save_checkpoint(ckpt, step + 1, {"vae": vae}, opt, {"train_seconds": elapsed + time.time() - t0})
    train_seconds = elapsed + time.time() - t0
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, seed))
    vae.save_pretrained(out / "vae")
    atomic_write_json(
        out / "vae_training.json",
        dict(steps=steps, stopped_at=end, batch=batch, crop=crop, lr=lr, seed=seed, kl_weight=kl_weight,
             grad_weight=grad_weight, lowpass_weight=lowpass_weight, train_seconds=train_seconds, device=device,
             torch=torch.__version__, scaling_factor=vae.config.scaling_factor),
    )
    return vae


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop (and export) after this step; rerun to resume")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    vae = train_vae(a.out, steps=a.steps, batch=a.batch, seed=a.seed, device=a.device, save_every=a.save_every,
                    stop_at=a.stop_at)
    print(json.dumps({"out": str(a.out / "vae"), "scaling_factor": vae.config.scaling_factor}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
