"""Offline models: tiny SD-architecture pipelines, full-size U-Net architectures, the reference model."""

from .full import build_full_pipeline, build_full_unet, count_parameters, full_unet_config
from .tiny import FAMILIES, build_tiny_pipeline, save_tiny_pipeline, tiny_unet_config
from .tokenizer import build_clip_tokenizer

__all__ = [
    "FAMILIES",
    "build_clip_tokenizer",
    "build_full_pipeline",
    "build_full_unet",
    "build_tiny_pipeline",
    "count_parameters",
    "full_unet_config",
    "save_tiny_pipeline",
    "tiny_unet_config",
]
