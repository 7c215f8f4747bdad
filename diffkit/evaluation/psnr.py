"""PSNR between two image sets made from the same prompts and seeds (fidelity of a faster pipeline).

For images a, b with values in [0, 1] (peak 1):

    PSNR(a, b) = 10 log10(1 / MSE(a, b)),  MSE over all pixels and channels;  +inf when a == b.

``psnr`` returns one value per image pair; ``mean_psnr`` averages them (the usual report: mean of per-image
PSNR, not PSNR of the pooled MSE). uint8 inputs are compared after /255, so they are on the same scale.
"""

from __future__ import annotations

import math

import torch

from .images import to_float_images


def psnr(images_a, images_b, value_range=None) -> torch.Tensor:
    """Per-pair PSNR in dB, shape (N,); ``inf`` for identical pairs."""
    a, b = to_float_images(images_a, value_range), to_float_images(images_b, value_range)
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (N, 3, H, W)")
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    return torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))


def mean_psnr(images_a, images_b, value_range=None) -> float:
    """Mean of the per-pair PSNR (``inf`` if every pair is identical)."""
    return float(psnr(images_a, images_b, value_range).mean())
