"""Deterministic renderer of the shapes world: one object on a plain background, numpy + PIL only.

Shapes are drawn as masks at ``SUPERSAMPLE`` times the output size and box-filtered down, so edges
are anti-aliased and the same spec always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND_RGB, COLOR_RGB, FACTORS

SUPERSAMPLE = 4
#: Pattern periods and outline width, as fractions of the image side (so any ``size`` looks alike).
#: A pixel of the reference VAE's 16x16 latent is 4 px: stripes repeat every 3 latent pixels, dots every
#: 3.5 and checks every 5.5. With stripes and dots 2 and checks 2.5 latent pixels apart (8, 8 and 10 px,
#: the first three weights) the U-Net drew dots as rows that merge into stripes and checks as dots (style
#: 73%); with stripes and dots at 12 px and checks at 16 px (diagonal lattice 11.3 px, like the dots'),
#: stripes came out right but dots and checks were drawn as each other (dotted 39%, checkered 45% at step
#: 5500). Dots are now small and sparse, checks large: they differ in scale and in coverage.
STRIPE_PERIOD = 12 / 64
DOT_PERIOD = 14 / 64
CHECKER_PERIOD = 22 / 64
#: Radius of a dot, as a fraction of the dot period (28% of the object in colour, checks and stripes 50%).
DOT_RADIUS = 0.3
OUTLINE_WIDTH = 3 / 64
#: Ranges of the continuous factors: radius (fraction of the side) and rotation (degrees).
SIZE_RANGE = (0.22, 0.32)
ROTATION_RANGE = (0.0, 360.0)


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the world: four categorical factors and the object's placement.

    ``x``, ``y`` are the centre and ``size`` the radius, all as fractions of the image side;
    ``rotation`` is in degrees.
    """

    object: str
    color: str
    style: str
    background: str
    x: float = 0.5
    y: float = 0.5
    size: float = 0.25
    rotation: float = 0.0

    def __post_init__(self):
        for factor, values in FACTORS.items():
            value = getattr(self, factor)
            if value not in values:
                raise ValueError(f"{factor} must be one of {values}, got {value!r}")
        if not 0.05 <= self.size <= 0.5:
            raise ValueError(f"size must be in [0.05, 0.5], got {self.size}")
        for name in ("x", "y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


_SPEC_FIELDS = tuple(f.name for f in fields(ShapeSpec))


def sample_spec(
    rng: np.random.Generator,
    *,
    rotation_range: tuple[float, float] = ROTATION_RANGE,
    center_range: float | None = None,
    **fixed,
) -> ShapeSpec:
    """Draw a spec: the factors in ``fixed`` are pinned, the rest (and placement) drawn from ``rng``.

    ``rotation_range`` (degrees) and ``center_range`` (largest offset of the centre from the middle, as a
    fraction of the side; None: anywhere the object fits) narrow the placement. The number of draws from
    ``rng`` does not depend on them, so the same seed gives the same factors whatever the ranges.
    """
    if rotation_range[0] > rotation_range[1]:
        raise ValueError(f"rotation_range must be (low, high) with low <= high, got {rotation_range}")
    if center_range is not None and not 0.0 <= center_range <= 0.5:
        raise ValueError(f"center_range must be in [0, 0.5], got {center_range}")
    unknown = set(fixed) - set(_SPEC_FIELDS)
    if unknown:
        raise ValueError(f"unknown spec fields {sorted(unknown)}; allowed: {_SPEC_FIELDS}")
    values = {}
    for factor, choices in FACTORS.items():  # always draw, so pinning one factor keeps the others' stream
        values[factor] = choices[int(rng.integers(len(choices)))]
    size = float(rng.uniform(*SIZE_RANGE))
    margin = size + 0.03
    if center_range is not None:  # never outside the frame, however wide the range asked
        margin = max(margin, 0.5 - center_range)
    values.update(
        size=size,
        x=float(rng.uniform(margin, 1 - margin)),
        y=float(rng.uniform(margin, 1 - margin)),
        rotation=float(rng.uniform(*rotation_range)),
    )
    values.update(fixed)
    return ShapeSpec(**values)


def _polygon(n: int, inner: float | None = None, phase: float = -90.0) -> np.ndarray:
    """Unit regular polygon (or star when ``inner`` is given), first vertex up."""
    k = 2 * n if inner else n
    ang = np.deg2rad(phase + 360.0 * np.arange(k) / k)
    r = np.ones(k)
    if inner:
        r[1::2] = inner
    return np.stack([r * np.cos(ang), r * np.sin(ang)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / np.abs(pts).max()


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 1.0
    return np.array(
        [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    )


# Unit outlines (radius ~1) of the polygonal objects; circle and moon are drawn from ellipses.
_OUTLINES = {
    "square": _polygon(4, phase=-45.0) * 0.9,
    "triangle": _polygon(3) * 1.05 + np.array([0.0, 0.15]),
    "star": _polygon(5, inner=0.45) * 1.08,
    "heart": _heart(),
    "cross": _cross(),
    "hexagon": _polygon(6),
}
_MOON_CUT = (0.5, -0.15, 0.78)  # offset x, offset y, radius of the disc cut out of the unit disc


def _rotate(pts: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return pts @ np.array([[c, s], [-s, c]])


def object_mask(spec: ShapeSpec, side: int) -> np.ndarray:
    """Boolean ``side x side`` mask of the object (no anti-aliasing; render supersamples it)."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.x * side, spec.y * side, spec.size * side
    if spec.object in ("circle", "moon"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if spec.object == "moon":
            ox, oy, cr = _MOON_CUT
            off = _rotate(np.array([[ox, oy]]), spec.rotation)[0] * r
            px, py = cx + off[0], cy + off[1]
            draw.ellipse((px - cr * r, py - cr * r, px + cr * r, py + cr * r), fill=0)
    else:
        pts = _rotate(_OUTLINES[spec.object], spec.rotation) * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(img) > 127


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square, separable; the mask never touches the border."""
    out = mask.copy()
    for axis in (0, 1):
        cur = out.copy()
        for d in range(1, radius + 1):
            cur &= np.roll(out, d, axis) & np.roll(out, -d, axis)
        out = cur
    return out


def _pattern(spec: ShapeSpec, side: int) -> np.ndarray:
    """Boolean ``side x side`` map: True where the object shows its color (False: the tint)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    c, s = math.cos(math.radians(spec.rotation)), math.sin(math.radians(spec.rotation))
    # pattern coordinates rotate with the object and are anchored at its centre
    u = ((xx - spec.x * side) * c + (yy - spec.y * side) * s) / side
    v = (-(xx - spec.x * side) * s + (yy - spec.y * side) * c) / side
    if spec.style == "striped":
        return np.floor(u / STRIPE_PERIOD * 2) % 2 == 0
    if spec.style == "checkered":
        return (np.floor(u / CHECKER_PERIOD * 2) + np.floor(v / CHECKER_PERIOD * 2)) % 2 == 0
    if spec.style == "dotted":
        du = u / DOT_PERIOD - np.round(u / DOT_PERIOD)
        dv = v / DOT_PERIOD - np.round(v / DOT_PERIOD)
        return du**2 + dv**2 < DOT_RADIUS**2
    return np.ones((side, side), bool)


def _tint(color: np.ndarray, background: str) -> np.ndarray:
    # the second color of patterned styles: a light tint on dark backgrounds, a dark shade on light ones
    target = 0.0 if background == "white" else 255.0
    return 0.45 * color + 0.55 * target


def render(spec: ShapeSpec, size: int = 64) -> np.ndarray:
    """Render ``spec`` as a ``size x size x 3`` uint8 array (deterministic)."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    side = size * SUPERSAMPLE
    mask = object_mask(spec, side)
    color = np.array(COLOR_RGB[spec.color], np.float32)
    bg = np.array(BACKGROUND_RGB[spec.background], np.float32)
    img = np.empty((side, side, 3), np.float32)
    img[:] = bg
    if spec.style == "outlined":
        width = max(1, round(OUTLINE_WIDTH * side))
        img[mask & ~_erode(mask, width)] = color
    else:
        on = _pattern(spec, side)
        img[mask & on] = color
        img[mask & ~on] = _tint(color, spec.background)
    small = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)
