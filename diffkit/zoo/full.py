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
