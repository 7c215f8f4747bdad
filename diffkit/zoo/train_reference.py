"""Train the reference text-to-image model on the shapes world (step 2 of 2; step 1 is ``train_vae``).

A real Stable Diffusion pipeline, small: the VAE from ``train_vae`` (frozen; latents 8x16x16), a
``CLIPTextModel`` and a ``UNet2DConditionModel`` trained jointly from scratch with SD's noise schedule
(scaled-linear betas 0.00085..0.012, 1000 steps) and v-prediction (as SD 2.x), Min-SNR-5 loss weighting
(Hang et al. 2023: w_t = min(SNR_t, 5) / (SNR_t + 1) for v) to converge in fewer steps, 10% empty
captions so classifier-free guidance works, and an EMA of the weights, which is what ships.

    python -m diffkit.zoo.train_reference --out runs/ref [--vae runs/ref/vae] [--steps 7000] [--device cpu]

The training set: ``--images`` renders of specs outside the held-out (object, color, style) triples,
in a narrowed pose (``--rotation 15``: upright within 15 degrees; ``--center-range 0.08``: centre within
8% of the side from the middle; size as drawn by the world), encoded once to latent posteriors. Over the
world's full 360-degree rotation the conditional mean of "a star" is a round blob, and a model trained for
minutes stays near such means (the first shipped weights drew blobs); upright and centred, the mean
already has the outline. The VAE and the oracle still see the full range.
Every step draws fresh captions (random synonyms and templates, evaluation-only synonyms included) and
fresh posterior samples. Checkpoints every ``--save-every``
steps (safetensors + JSON, atomic); rerunning the same command resumes. Each step's randomness is
seeded by (seed, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..noise import add_noise, prediction_target, training_level
from .checkpointing import atomic_write_json, load_checkpoint, save_checkpoint
from .shapes import HELDOUT, caption, render, vocabulary
from .tiny import SD_SCHEDULER
from .tokenizer import build_clip_tokenizer
from .train_vae import to_tensor, training_specs

MAX_TOKENS = 32
#: v-prediction (as SD 2.x): with epsilon prediction the x0 estimate at t ~ 1000 multiplies the model's
#: error by sqrt(1 - abar) / sqrt(abar) ~ 15; after 600 steps such a model denoised half-noised latents
#: well but turned pure noise into noise.
PREDICTION_TYPE = "v_prediction"

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=8,  # the VAE's latent channels (train_vae.VAE_CONFIG)
    out_channels=8,
    layers_per_block=1,
    # the 16x16 level draws the styles' textures (periods of 3 to 5.5 latent pixels, see shapes.render):
    # at 32 channels the second weights blended them (style 72%); 64 costs ~20% more per step
    block_out_channels=(64, 64, 128),
    # cross-attention at 8x8 and 4x4 only: attention at 16x16 would double the cost of a step on CPU
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=128,
    # few, wide groups: GroupNorm rescales each group per sample, and colour lives in the ratios of
    # the latent channels (see train_vae.VAE_CONFIG)
    norm_num_groups=4,
)


def build_tokenizer():
    return build_clip_tokenizer(vocabulary(), model_max_length=MAX_TOKENS)


def text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_models(tokenizer, seed: int):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    return unet, text_encoder


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, n: int, seed: int, batch: int = 256, **pose):
    """Render ``n`` training specs and encode them; return (specs, posterior means, posterior stds)."""
    rng = np.random.default_rng([seed, 2])
    specs = training_specs(rng, n, **pose)
    means, stds = [], []
    for i in tqdm(range(0, n, batch), desc="encode"):
        x = to_tensor(np.stack([render(s) for s in specs[i : i + batch]]))
        post = vae.encode(x).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return specs, torch.cat(means), torch.cat(stds)


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float = 5.0, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-gamma weights for the v-prediction loss: clamp(SNR_t, floor, gamma) / (SNR_t + 1).

    Hang et al. (2023), eq. 7 with ``floor = 0``: the x0-space weight is min(SNR_t, gamma), translated to the
    v loss by dividing by SNR_t + 1. Under a zero-terminal-SNR schedule that weight is 0 at t = T, the very
    step that must learn an image's overall brightness from the prompt; ``floor`` > 0 keeps an x0-space
    weight of at least ``floor`` there (diffkit's choice, not in the paper).
    """
    level = training_level(scheduler.alphas_cumprod, t)
    snr = (level.alpha / level.sigma).reshape(-1) ** 2
    return torch.clamp(snr, min=floor, max=gamma) / (snr + 1)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up min(decay, (1+s)/(10+s))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p, 1 - d)


def _lr_lambda(steps: int, warmup: int):
    def f(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))

    return f


def noise_schedule(zero_terminal_snr: bool) -> dict:
    """Scheduler arguments of the training noise schedule.

    ``zero_terminal_snr``: Lin et al. (WACV 2024), "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1: rescale the betas so that alpha_bar_T = 0 (SD's schedule leaves
    sqrt(alpha_bar_T) ~ 0.068 of the image at t = T, so the image's overall brightness at sampling time
    comes from the starting noise, not the prompt); it needs v-prediction (eps carries no information at
    SNR 0) and sampling from t = T, i.e. "trailing" timestep spacing (section 3.3).
    """
    return dict(rescale_betas_zero_snr=True) if zero_terminal_snr else {}


def build_pipeline(vae, text_encoder, tokenizer, unet, zero_terminal_snr: bool = False) -> StableDiffusionPipeline:
    sampling = dict(noise_schedule(True), timestep_spacing="trailing") if zero_terminal_snr else {}
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type=PREDICTION_TYPE, **sampling),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_reference(
    out: Path,
    vae_path: Path | None = None,
    steps: int = 7000,
    batch: int = 64,
    images: int = 24000,
    lr: float = 8e-4,
    seed: int = 0,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.998,
    save_every: int = 500,
    device: str = "cpu",
    stop_at: int | None = None,
    rotation: float | None = 15.0,
    center_range: float | None = 0.08,
    min_snr_gamma: float | None = 5.0,
    min_snr_floor: float = 0.0,
    zero_terminal_snr: bool = False,
    offset_noise: float = 0.0,
    schedule_steps: int | None = None,
) -> StableDiffusionPipeline:
    """Train (or resume) in ``out``; export the EMA pipeline to ``out/pipeline`` and return it.

    ``zero_terminal_snr``: see :func:`noise_schedule` (the shipped scheduler then samples with trailing
    spacing). ``offset_noise``: the older fix of the same flaw (Guttenberg 2023): training noise plus
    ``offset_noise`` times a per-sample, per-channel constant N(0, 1), so that the model learns to change
    an image's mean.

    ``schedule_steps``: length of the learning-rate schedule (default ``steps``); the steps after it train at
    the schedule's final rate (a tenth of ``lr``). So ``steps=10000, schedule_steps=7000`` is the 7000-step
    recipe trained 3000 steps longer, and it resumes from that recipe's checkpoint exactly.

    ``stop_at`` ends the run after that step (checkpointed) and exports the model as it is then; rerunning
    with a later ``stop_at`` (or none) resumes the same schedule.
    """
    if rotation is not None and not 0.0 <= rotation <= 180.0:
        raise ValueError(f"rotation must be in [0, 180] degrees (or None: the world's full range), got {rotation}")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or None: unweighted v loss), got {min_snr_gamma}")
    if min_snr_floor < 0 or (min_snr_gamma is not None and min_snr_floor > min_snr_gamma):
        raise ValueError(f"min_snr_floor must be in [0, min_snr_gamma], got {min_snr_floor}")
    if min_snr_floor and min_snr_gamma is None:
        raise ValueError("min_snr_floor needs Min-SNR weighting (min_snr_gamma > 0)")
    if schedule_steps is not None and not 0 < schedule_steps <= steps:
        raise ValueError(f"schedule_steps must be in [1, steps={steps}], got {schedule_steps}")
    if not 0.0 <= offset_noise <= 1.0:
        raise ValueError(f"offset_noise must be in [0, 1], got {offset_noise}")
    out = Path(out)
    vae = AutoencoderKL.from_pretrained(vae_path or out / "vae").eval().requires_grad_(False)
    tokenizer = build_tokenizer()
    unet, text_encoder = build_models(tokenizer, seed)
    unet.to(device).train()
    text_encoder.to(device).train()
    ema_unet, ema_text = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lr_lambda = _lr_lambda(schedule_steps or steps, warmup=100)
    noise_sched = DDPMScheduler(
        **{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}, prediction_type=PREDICTION_TYPE,
        **noise_schedule(zero_terminal_snr),
    )
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet.module, "ema_text": ema_text.module}

    ckpt = out / "unet_checkpoint"
    meta = load_checkpoint(ckpt, modules, opt)
    start = meta["step"] if meta else 0
    elapsed = meta.get("train_seconds", 0.0) if meta else 0.0
    cpu_elapsed = meta.get("cpu_seconds", 0.0) if meta else 0.0

    t0, c0 = time.time(), time.process_time()
    end = steps if stop_at is None else min(stop_at, steps)
    # a run resumed at its end only exports: no need to encode the data set
    pose = dict(center_range=center_range)
    if rotation is not None:
        pose["rotation_range"] = (-rotation, rotation)
    specs, means, stds = encode_dataset(vae, images, seed, **pose) if start < end else ([], None, None)
    scale = vae.config.scaling_factor
    bar = tqdm(range(start, end), initial=start, total=steps, desc="unet")
    for step in bar:
        for group in opt.param_groups:  # the schedule is a pure function of the step, so resuming is exact
            group["lr"] = lr * lr_lambda(step)
        rng = np.random.default_rng([seed, 3, step])
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = rng.integers(0, len(specs), size=batch)
        texts = ["" if rng.random() < caption_dropout else caption(specs[i], rng) for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        idx_t = torch.from_numpy(idx)
        z = means[idx_t].float() + stds[idx_t].float() * torch.randn(means[idx_t].shape, generator=gen)
        z = (z * scale).to(device)
        noise = torch.randn(z.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn((*z.shape[:2], 1, 1), generator=gen)
        noise = noise.to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        level = training_level(noise_sched.alphas_cumprod, t.to(device))
        noisy = add_noise(z, noise, level)
        cond = text_encoder(ids.input_ids.to(device))[0]
        pred = unet(noisy, t.to(device), cond).sample
        if min_snr_gamma is None:
            w = torch.ones(batch, device=device)
        else:
            w = min_snr_weights(noise_sched, t, min_snr_gamma, min_snr_floor).to(device)
        target = prediction_target(z, noise, level, PREDICTION_TYPE)  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        loss = (w * F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == end:
            save_checkpoint(
                ckpt, step + 1, modules, opt,
                {"train_seconds": elapsed + time.time() - t0, "cpu_seconds": cpu_elapsed + time.process_time() - c0},
            )
    train_seconds = elapsed + time.time() - t0
    cpu_seconds = cpu_elapsed + time.process_time() - c0

    pipe = build_pipeline(vae, ema_text.module, tokenizer, ema_unet.module, zero_terminal_snr)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    vae_meta = json.loads((out / "vae_training.json").read_text()) if (out / "vae_training.json").exists() else {}
    atomic_write_json(
        out / "pipeline" / "training.json",
        dict(
            steps=steps, schedule_steps=schedule_steps or steps, stopped_at=end, batch=batch, images=images, lr=lr,
            seed=seed, caption_dropout=caption_dropout,
            ema_decay=ema_decay, rotation=rotation, center_range=center_range, min_snr_gamma=min_snr_gamma,
            min_snr_floor=min_snr_floor, zero_terminal_snr=zero_terminal_snr, offset_noise=offset_noise,
            unet_seconds=train_seconds, unet_cpu_seconds=cpu_seconds,
            vae=vae_meta, device=device, threads=torch.get_num_threads(),
            cpu=platform.processor() or platform.machine(), torch=torch.__version__, heldout=sorted(map(list, HELDOUT)),
        ),
    )
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vae", type=Path, default=None, help="trained VAE folder (default: OUT/vae)")
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=24000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--stop-at", type=int, default=None, help="stop (and export) after this step; rerun to resume")
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--rotation", type=float, default=15.0,
                   help="train on rotations in [-DEG, DEG]; a negative value: the world's full range")
    p.add_argument("--center-range", type=float, default=0.08,
                   help="train on centres at most this far from the middle, as a fraction of the side; "
                   "a negative value: anywhere the object fits")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR-gamma loss weighting; 0: unweighted v loss (note: Min-SNR gives the SNR-0 step of a "
                   "zero-terminal-SNR schedule weight 0)")
    p.add_argument("--min-snr-floor", type=float, default=0.0,
                   help="lower clamp of the Min-SNR weight's SNR (x0-space weight >= FLOOR), so that the SNR-0 step "
                   "of a zero-terminal-SNR schedule still learns (0: the paper's weights)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the schedule to zero terminal SNR and sample with trailing spacing (Lin et al. 2024)")
    p.add_argument("--offset-noise", type=float, default=0.0, help="offset-noise strength (0: off; 0.1 is common)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the learning-rate schedule (default: --steps); later steps train at its final "
                   "rate, so a finished run can be trained longer from its checkpoint")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train_reference(
        a.out, a.vae, steps=a.steps, batch=a.batch, images=a.images, seed=a.seed, device=a.device,
        save_every=a.save_every, stop_at=a.stop_at, ema_decay=a.ema_decay,
        rotation=None if a.rotation < 0 else a.rotation, center_range=None if a.center_range < 0 else a.center_range,
        min_snr_gamma=a.min_snr_gamma or None, min_snr_floor=a.min_snr_floor,
        zero_terminal_snr=a.zero_terminal_snr, offset_noise=a.offset_noise, schedule_steps=a.schedule_steps,
    )
    print(json.dumps({"out": str(a.out / "pipeline")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
