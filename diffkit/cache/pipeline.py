"""Pipeline methods: ``enable_deepcache`` / ``disable_deepcache`` (mixed into every diffkit pipeline).

The mechanism lives in :mod:`diffkit.cache.hook` and works on the bare U-Net; the pipeline only picks
the U-Net, hands over its scheduler (read through the pipeline, so a scheduler swapped after enabling
is the one used) and relies on ``GuidanceCallMixin`` resetting stateful U-Net hooks at every call.
"""

from __future__ import annotations

import weakref

from .config import DeepCacheConfig
from .hook import apply_deepcache, deepcache_config, deepcache_stats, remove_deepcache


class _PipelineScheduler:
    """``.timesteps`` of whatever scheduler the pipeline has now (weak reference: no cycle)."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)

    @property
    def timesteps(self):
        pipe = self._pipe()
        return None if pipe is None else pipe.scheduler.timesteps


class DeepCacheMixin:
    def enable_deepcache(self, interval: int = 3, branch: int = 0, schedule: str = "uniform",
                         center: int | None = None, power: float = 1.4) -> DeepCacheConfig:
        """Reuse the U-Net's deep features between steps (DeepCache, Ma et al. 2024).

        ``interval`` N: one full U-Net step every N steps (uniform) or ceil(T/N) full steps (non-uniform);
        ``branch``: the skip branch recomputed on cached steps (0 = shallowest, fastest; the paper's
        branch k is k - 1); ``schedule``: ``"uniform"`` or ``"non-uniform"`` (eq. 7, denser full steps
        around step ``center``, exponent ``power``). See :class:`diffkit.cache.DeepCacheConfig`.
        ControlNet pipelines run the ControlNet's shallow branch on cached steps too. Calling it again
        replaces the settings. Returns the config in force.
        """
        config = DeepCacheConfig(interval=interval, branch=branch, schedule=schedule, center=center, power=power)
        return apply_deepcache(self.unet, config, scheduler=_PipelineScheduler(self),
                               controlnet=getattr(self, "controlnet", None))

    def disable_deepcache(self) -> None:
        """Remove DeepCache; the U-Net then computes exactly as if it had never been enabled."""
        remove_deepcache(self.unet)

    @property
    def deepcache(self) -> DeepCacheConfig | None:
        """The DeepCache config in force, or ``None``."""
        return deepcache_config(self.unet)

    def deepcache_stats(self) -> dict:
        """Full and cached U-Net evaluations of the last call (see :func:`diffkit.cache.deepcache_stats`)."""
        return deepcache_stats(self.unet)
