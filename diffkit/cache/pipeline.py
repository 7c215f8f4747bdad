"""DeepCache as a lifecycle feature, and the pipeline verbs ``enable_deepcache`` / ``disable_deepcache``.

The mechanism lives in :mod:`diffkit.cache.hook` and works on the bare U-Net. The feature kind
``"deepcache"`` (touches the U-Net forward; stage "forward"; reattachable) hands the hook the
pipeline's scheduler (read through the pipeline, so a scheduler swapped after enabling is the one
used) and its ControlNet; the pipeline call resets its cache (``FeatureSet.begin_call``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from ..lifecycle import FeatureKind, Touch, features_of, register_feature
from .config import DeepCacheConfig
from .hook import apply_deepcache, deepcache_config, deepcache_stats, remove_deepcache, reset_deepcache


class _PipelineScheduler:
    """``.timesteps`` of whatever scheduler the pipeline has now (weak reference: no cycle)."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)

    @property
    def timesteps(self):
        pipe = self._pipe()
        return None if pipe is None else pipe.scheduler.timesteps


@dataclass
class DeepCacheState:
    unet: object

    def reset(self) -> None:
        reset_deepcache(self.unet)


def _attach(pipe, config: DeepCacheConfig) -> DeepCacheState:
    apply_deepcache(pipe.unet, config, scheduler=_PipelineScheduler(pipe), controlnet=getattr(pipe, "controlnet", None))
    return DeepCacheState(pipe.unet)


def _update(pipe, state: DeepCacheState, config: DeepCacheConfig) -> DeepCacheState:
    return _attach(pipe, config)  # apply_deepcache keeps the hooks when the branch is unchanged


def _detach(pipe, state: DeepCacheState) -> None:
    remove_deepcache(state.unet)


DEEPCACHE = register_feature(FeatureKind(
    "deepcache", Touch.UNET_FORWARD, "forward", _attach, _detach, reattachable=True, update=_update,
    describe=lambda c: f"interval={c.interval}, branch={c.branch}, {c.schedule}",
))


class DeepCacheMixin:
    def enable_deepcache(self, interval: int = 3, branch: int = 0, schedule: str = "uniform",
                         center: int | None = None, power: float = 1.4) -> DeepCacheConfig:
        """Reuse the U-Net's deep features between steps (DeepCache, Ma et al. 2024).

        ``interval`` N: one full U-Net step every N steps (uniform) or ceil(T/N) full steps (non-uniform);
        ``branch``: the skip branch recomputed on cached steps (0 = shallowest, fastest; the paper's
        branch k is k - 1); ``schedule``: ``"uniform"`` or ``"non-uniform"`` (eq. 7, denser full steps
        around step ``center``, exponent ``power``). See :class:`diffkit.cache.DeepCacheConfig`.
        ControlNet pipelines run the ControlNet's shallow branch on cached steps too. Calling it again
        replaces the settings. Returns the config in force. A thin call of
        ``pipe.features.attach("deepcache", config)``.
        """
        config = DeepCacheConfig(interval=interval, branch=branch, schedule=schedule, center=center, power=power)
        features_of(self).attach("deepcache", config)
        return config

    def disable_deepcache(self) -> None:
        """Remove DeepCache; the U-Net then computes exactly as if it had never been enabled."""
        features_of(self).detach_all("deepcache")

    @property
    def deepcache(self) -> DeepCacheConfig | None:
        """The DeepCache config in force, or ``None``."""
        return deepcache_config(self.unet)

    def deepcache_stats(self) -> dict:
        """Full and cached U-Net evaluations of the last call (see :func:`diffkit.cache.deepcache_stats`)."""
        return deepcache_stats(self.unet)
