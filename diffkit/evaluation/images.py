"""One explicit conversion of image batches to float tensors, shared by the oracle and the metrics.

Accepted inputs (anything else is a ``ValueError`` that says what was given):

* a PIL image or a list of PIL images (mode ``"RGB"``);
* ``uint8`` numpy arrays / torch tensors, one image ``(H, W, 3)`` / ``(3, H, W)`` or a batch
  ``(N, H, W, 3)`` / ``(N, 3, H, W)``, or a list of single images; values 0..255;
* floating-point arrays / tensors in the same layouts, **only with** ``value_range=(0, 1)`` (e.g.
  diffusers' ``output_type="pt"`` / ``"np"``) or ``value_range=(-1, 1)`` (e.g. a VAE decode). A float batch
  carries no trustworthy record of its range, so the caller must state it.

The result is always ``float32`` of shape ``(N, 3, H, W)`` with values in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

VALUE_RANGES = ((0, 1), (-1, 1))
# Float images slightly outside their range (an unclamped VAE decode overshoots by a few percent) are
# clipped; anything beyond this tolerance means the caller stated the wrong range (e.g. 0..255 floats).
RANGE_TOLERANCE = 0.1


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def _channel_first(t: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` or ``(N, 3, H, W)`` -> ``(N, 3, H, W)``."""
    if t.ndim != 4:
        raise ValueError(f"images must be one image (H, W, 3)/(3, H, W) or a batch (N, H, W, 3)/(N, 3, H, W); "
                         f"got shape {tuple(t.shape)}")
    if t.shape[-1] == 3:
        return t.permute(0, 3, 1, 2)
    if t.shape[1] == 3:
        return t
    raise ValueError(f"images must have 3 color channels (RGB) first or last; got shape {tuple(t.shape)}")


def to_float_images(images, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Convert ``images`` to a ``float32`` tensor ``(N, 3, H, W)`` in ``[0, 1]`` (see the module docstring)."""
    if value_range is not None:
        value_range = tuple(value_range)
        if value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
    if _is_pil(images):
        images = [images]
    if isinstance(images, Sequence) and not isinstance(images, str):
        if len(images) == 0:
            raise ValueError("images is empty: need at least one image")
        if all(_is_pil(im) for im in images):
            modes = sorted({im.mode for im in images})
            if modes != ["RGB"]:
                raise ValueError(f"PIL images must be RGB, got mode(s) {', '.join(modes)}; "
                                 "convert them with image.convert('RGB')")
            sizes = sorted({im.size for im in images})
            if len(sizes) > 1:
                raise ValueError(f"all images must have the same size, got {sizes}")
            images = np.stack([np.asarray(im) for im in images])
        elif any(_is_pil(im) for im in images):
            raise ValueError("images mixes PIL images with arrays; pass one kind")
        else:
            items = [torch.as_tensor(np.asarray(im)) if not isinstance(im, torch.Tensor) else im for im in images]
            if any(it.ndim != 3 for it in items):
                raise ValueError("a list of arrays must hold single images of shape (H, W, 3) or (3, H, W); "
                                 f"got shapes {sorted({tuple(it.shape) for it in items})}")
            shapes = sorted({tuple(it.shape) for it in items})
            if len(shapes) > 1:
                raise ValueError(f"all images must have the same shape, got {shapes}")
            dtypes = {it.dtype for it in items}
            if len(dtypes) > 1:
                raise ValueError(f"all images must have the same dtype, got {sorted(map(str, dtypes))}")
            images = torch.stack(items)
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind not in "uif":
            raise ValueError(f"images must be uint8 or floating point, got numpy dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError("images must be a PIL image, a list of PIL images, or a uint8/float numpy array or "
                         f"torch tensor; got {type(images).__name__}")
    t = images.detach().cpu()
    if t.numel() == 0:
        raise ValueError(f"images is empty: shape {tuple(t.shape)}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    t = _channel_first(t)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or floating point with value_range; got dtype {t.dtype}")
    if value_range is None:
        raise ValueError("floating-point images need an explicit value_range=(0, 1) or (-1, 1); "
                         "uint8 images and PIL images need none")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = value_range
    tmin, tmax = float(t.min()), float(t.max())
    if tmin < lo - RANGE_TOLERANCE or tmax > hi + RANGE_TOLERANCE:
        raise ValueError(f"images have values in [{tmin:.4g}, {tmax:.4g}], outside the stated value_range "
                         f"{value_range}; state the range the images are really in")
    if lo == -1:
        t = (t + 1.0) / 2.0
    return t.clamp_(0.0, 1.0).contiguous()


def to_uint8_images(images, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Convert ``images`` (any accepted form) to a ``uint8`` numpy array ``(N, H, W, 3)``."""
    t = to_float_images(images, value_range)
    return (t.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
