"""Tiny Stable-Diffusion-architecture pipelines with random weights, for tests and offline demos.

The classes are the real ones (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, a BPE
``CLIPTokenizer``), only small, so every code path that runs here runs unchanged on real checkpoints.
Weights are deterministic by seed. ``save_tiny_pipeline`` writes the diffusers folder layout so tests
exercise the real ``from_pretrained`` loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer

FAMILIES = ("sd15", "sd2", "sdxl")

# The schedule every SD 1.x/2.x/XL checkpoint ships with (DDIM form).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def tiny_unet_config(family: str = "sd15") -> dict:
    """A three-level U-Net with SD's block layout (two cross-attention levels, one plain level)."""
    _check_family(family)
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    if family == "sd2":
        cfg.update(attention_head_dim=(4, 8, 8), use_linear_projection=True)
    if family == "sdxl":
        cfg.update(
            attention_head_dim=(4, 8, 8),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            cross_attention_dim=64,
        )
    return cfg


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _text_config(hidden_act: str = "quick_gelu", projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    """A four-level VAE (8x spatial downsampling, 4 latent channels, like SD's)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _fix_token_ids(config: CLIPTextConfig, tokenizer) -> CLIPTextConfig:
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_tiny_pipeline(family: str = "sd15", seed: int = 0, words=()):
    """Return a tiny random-weight diffusers pipeline of the given family ("sd15", "sd2", "sdxl").

    sd2 is v-prediction with linear projections (as SD 2.x 768px); sdxl has two text encoders and
    size/crop conditioning. The images are 64x64 (latents 4x8x8).
    """
    _check_family(family)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = tiny_vae()
    tokenizer = build_clip_tokenizer(words)
    sched_cfg = dict(SD_SCHEDULER)
    if family == "sd2":
        sched_cfg["prediction_type"] = "v_prediction"
    scheduler = DDIMScheduler(**sched_cfg)
    if family == "sdxl":
        te1 = CLIPTextModel(_fix_token_ids(_text_config(), tokenizer))
        te2 = CLIPTextModelWithProjection(_fix_token_ids(_text_config("gelu"), tokenizer))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=build_clip_tokenizer(words),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        act = "gelu" if family == "sd2" else "quick_gelu"
        te = CLIPTextModel(_fix_token_ids(_text_config(act), tokenizer))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline and write it with ``save_pretrained``; return the folder."""
    path = Path(path)
    build_tiny_pipeline(family, seed).save_pretrained(path)
    return path
