"""Full-size SD 1.5 and SDXL U-Net architectures with random weights (FLOPs do not depend on weights).

Used by the GPU speed and memory benchmarks, and for parameter/MAC counts on the ``meta`` device
(no memory is allocated there).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

ARCHITECTURES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def full_unet_config(arch: str) -> dict:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return dict(ARCHITECTURES[arch])


def build_full_unet(arch: str = "sd15", device: str | torch.device = "meta", dtype=torch.float32, seed: int = 0):
    """Build the full-size U-Net; on ``meta`` nothing is allocated (for counting parameters/MACs)."""
    cfg = full_unet_config(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    return unet if dtype == torch.float32 else unet.to(dtype=dtype)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def build_full_pipeline(arch: str = "sd15", device="cpu", dtype=torch.float32, seed: int = 0):
    """A full-size SD 1.5 pipeline (U-Net, CLIP ViT-L/14 text encoder, VAE) with random weights.

    For speed and memory benchmarks: compute does not depend on the weights. Only "sd15" has a whole
    pipeline here; SDXL benchmarks time the U-Net (``build_full_unet("sdxl")``), which dominates.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import SD_SCHEDULER
    from .tokenizer import build_clip_tokenizer

    if arch != "sd15":
        raise ValueError(f"build_full_pipeline supports arch='sd15' only, got {arch!r}")
    tokenizer = build_clip_tokenizer()
    text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(text_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
