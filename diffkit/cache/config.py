"""``DeepCacheConfig``: the hyper-parameters of DeepCache (Ma, Fang, Wang, CVPR 2024), validated.

* ``interval`` is the paper's N: one full U-Net step, then N - 1 cached steps (uniform 1:N, Sec. 3.3).
* ``branch`` is the skip branch the cached steps recompute down to, numbered like the reference helper's
  ``cache_branch_id``: the index of the U-Net skip connection in down-path order, 0 = the ``conv_in``
  output (shallowest). With ``layers_per_block=2`` (SD 1.x/2.x/XL) that is ``3 x block + layer``, and the
  paper's branch k is id k - 1. On a cached step at branch ``b`` the U-Net runs only

  - the time (and SDXL text/size) embedding, ``conv_in``;
  - the first ``b`` down layers (a "layer" is one resnet with its attention, or one downsampler),
    producing skips ``0..b``;
  - the up layers that consume skips ``b..0`` (the last ``b + 1`` resnets of the up path, each with
    its attention, and the upsamplers between them), the first of which is fed the cached deep
    feature: the hidden state entering that up layer at the last full step;
  - ``conv_norm_out``/``conv_act``/``conv_out``.

  Everything deeper (the other down layers, the mid block, the deeper up layers) is skipped. Branch
  ids run from 0 to (number of skip connections - 1): 0..11 for SD 1.x/2.x (4 levels), 0..8 for SDXL
  and the tiny zoo U-Nets (3 levels). For example branch 0 on SD 1.5 recomputes only
  ``up_blocks.3.resnets.2`` + ``up_blocks.3.attentions.2`` (fed the cached output of
  ``up_blocks.3.attentions.1``); branch 1 also ``down_blocks.0.resnets.0``/``attentions.0`` and
  ``up_blocks.3.resnets.1``/``attentions.1``. ``diffkit.cache.describe_branch(unet, b)`` lists the
  modules for any U-Net; docs/deepcache.md has the tables for SD 1.5 and SDXL.
* ``schedule``: ``"uniform"`` (full steps 0, N, 2N, ...) or ``"non-uniform"`` (paper eq. 7: ceil(T/N)
  full steps spaced quadratically denser around ``center`` with exponent ``power``); see
  :mod:`diffkit.cache.schedule`. ``center`` (a step index; ``None`` = round(0.3 T), the paper's 15 of 50)
  and ``power`` are used by the non-uniform schedule only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("uniform", "non-uniform")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    value = int(value.__index__())
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache hyper-parameters (see the module docstring for the exact meaning of ``branch``).

    ``interval >= 1`` (1 = every step full, i.e. no caching), ``branch >= 0`` (checked against a U-Net
    by :func:`diffkit.cache.apply_deepcache`), ``schedule`` in ``("uniform", "non-uniform")``,
    ``center`` ``None`` or a step index ``>= 0``, ``power >= 1`` (1 = evenly spaced full steps).
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: int | None = None
    power: float = 1.4

    def __post_init__(self):
        object.__setattr__(self, "interval", _check_int("interval", self.interval, 1))
        object.__setattr__(self, "branch", _check_int("branch", self.branch, 0))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.center is not None:
            object.__setattr__(self, "center", _check_int("center", self.center, 0))
        try:
            power = float(self.power)
        except (TypeError, ValueError):
            raise ValueError(f"power must be a number >= 1, got {self.power!r}") from None
        if not math.isfinite(power) or power < 1:
            raise ValueError(f"power must be a finite number >= 1, got {self.power!r}")
        object.__setattr__(self, "power", power)
