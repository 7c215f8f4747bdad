"""Color saturation of images: the measure of oversaturation under strong guidance.

HSV saturation of a pixel with channels (r, g, b) in [0, 1]:

    S = (max(r, g, b) - min(r, g, b)) / max(r, g, b),   S = 0 where max = 0 (black).

``mean_saturation`` is the mean of S over all pixels of all images. APG (Sadat et al., ICLR 2025) reports a
"saturation" score of generated images next to FID / precision / recall; read as the mean of the HSV
saturation channel it is this same quantity, so diffkit has one saturation measure (see docs/evaluation.md
for what could and could not be checked against the paper's text).
"""

from __future__ import annotations

import torch

from .images import to_float_images


def hsv_saturation(images, value_range=None) -> torch.Tensor:
    """Per-pixel HSV saturation, shape (N, H, W), in [0, 1]. ``images`` as in ``to_float_images``."""
    x = to_float_images(images, value_range)
    cmax = x.max(dim=1).values
    cmin = x.min(dim=1).values
    return torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax))


def image_saturation(images, value_range=None) -> torch.Tensor:
    """Mean HSV saturation of each image, shape (N,)."""
    return hsv_saturation(images, value_range).mean(dim=(1, 2))


def mean_saturation(images, value_range=None) -> float:
    """Mean HSV saturation over every pixel of every image (all images have the same size)."""
    return float(image_saturation(images, value_range).mean())
