"""DeepCache (Ma, Fang, Wang; CVPR 2024): training-free reuse of the U-Net's deep features between steps.

* :mod:`.config` — ``DeepCacheConfig`` (interval N, branch, schedule, centre, power);
* :mod:`.schedule` — which steps are full (uniform 1:N, non-uniform eq. 7);
* :mod:`.branch` — what a cached step runs at each skip branch of a U-Net;
* :mod:`.shallow` — the cached step itself (the shallow branch fed with the cached deep feature);
* :mod:`.controlnet` — the ControlNet's shallow branch on cached steps (only the residuals used);
* :mod:`.hook` — the diffusers ``ModelHook`` that chooses per step; ``apply_deepcache`` / ``remove_deepcache``;
* :mod:`.cost` — MACs of a cached step relative to a full step;
* :mod:`.pipeline` — ``pipe.enable_deepcache(...)`` / ``pipe.disable_deepcache()``.
"""

from .branch import BranchPlan, branch_plan, describe_branch, num_branches
from .config import SCHEDULES, DeepCacheConfig
from .controlnet import shallow_controlnet_forward
from .cost import cached_step_mac_ratio, speed_ceiling, unet_macs
from .hook import (
    apply_deepcache,
    deepcache_config,
    deepcache_stats,
    remove_deepcache,
    reset_deepcache,
)
from .schedule import full_steps, non_uniform_full_steps, non_uniform_power, num_full_steps, uniform_full_steps
from .shallow import shallow_forward

__all__ = [
    "SCHEDULES",
    "BranchPlan",
    "DeepCacheConfig",
    "apply_deepcache",
    "branch_plan",
    "cached_step_mac_ratio",
    "deepcache_config",
    "deepcache_stats",
    "describe_branch",
    "full_steps",
    "non_uniform_full_steps",
    "non_uniform_power",
    "num_branches",
    "num_full_steps",
    "remove_deepcache",
    "reset_deepcache",
    "shallow_controlnet_forward",
    "shallow_forward",
    "speed_ceiling",
    "uniform_full_steps",
    "unet_macs",
]
