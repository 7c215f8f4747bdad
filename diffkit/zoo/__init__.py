"""Offline models: tiny SD-architecture pipelines, full-size U-Net architectures, the reference model."""

from .classifier import load_reference_classifier
from .full import build_full_pipeline, build_full_unet, count_parameters, full_unet_config
from .reference import REFERENCE_GUIDANCE_SCALE, load_reference_pipeline, reference_path
from .tiny import FAMILIES, build_tiny_pipeline, save_tiny_pipeline, tiny_unet_config
from .tokenizer import build_clip_tokenizer

__all__ = [
    "FAMILIES",
    "REFERENCE_GUIDANCE_SCALE",
    "build_clip_tokenizer",
    "build_full_pipeline",
    "build_full_unet",
    "build_tiny_pipeline",
    "count_parameters",
    "full_unet_config",
    "load_reference_classifier",
    "load_reference_pipeline",
    "reference_path",
    "save_tiny_pipeline",
    "tiny_unet_config",
]
