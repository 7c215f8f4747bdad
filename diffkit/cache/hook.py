"""DeepCache on a ``UNet2DConditionModel`` through diffusers' hook system.

``apply_deepcache(unet, config)`` registers two ``ModelHook``s (no diffusers class is patched):

* ``DeepCacheHook`` on the U-Net (stateful, ``reset_state``): for every U-Net evaluation it works out
  the denoising step, asks the schedule whether the step is full, and runs either the U-Net's own
  forward (full step) or :func:`~diffkit.cache.shallow.shallow_forward` with the cached deep feature;
* ``_CaptureHook`` on the module where the branch's deep feature appears (the up block or up layer
  just above the branch), which keeps that tensor on every full step;
* with ``controlnet=``, a ``ShallowControlNetHook`` on each ControlNet (:mod:`diffkit.cache.controlnet`).

Step index. A step is a noise level: evaluation ``e`` is at the same step as evaluation ``e - 1`` when
it has the same timestep, at the next step when its timestep is lower, and starts a new trajectory
(step 0, cache cleared) when its timestep is higher or after ``reset_deepcache`` / a pipeline call
start. So every evaluation at one noise level shares that step's decision: PNDM/PLMS (whose warm-up
evaluates the second timestep twice) and Heun (two evaluations at each inner timestep) follow the
schedule by step, ``T`` steps give ``T`` noise levels, and an img2img call starting mid-schedule
starts at step 0. (A scheduler whose second evaluation sits at its own intermediate timestep, like
KDPM2, counts it as a step of its own.) The non-uniform schedule also needs ``T``: it is read at
step 0 from the scheduler given to ``apply_deepcache`` (pipelines pass theirs) as the number of
distinct noise levels from the current timestep to the end of ``scheduler.timesteps``.

A cached evaluation also needs a deep feature of the same batch and resolution; when there is none
(e.g. the batch changed) it runs in full instead. ``deepcache_stats(unet)`` reports what ran.

torch.compile: the decision is taken outside the compiled region (``torch.compiler.disable``), so a
compiled U-Net traces two programs, the full forward and the shallow one, and is not recompiled per
step (there is a graph break at the decision, so ``fullgraph=True`` cannot be used).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .branch import BranchPlan, branch_plan, check_unet
from .config import DeepCacheConfig
from .controlnet import HOOK_NAME as CONTROLNET_HOOK_NAME
from .controlnet import ShallowControlNetHook, check_controlnet, controlnets_of
from .schedule import full_steps
from .shallow import bind_forward_args, shallow_forward, uses_adapter

HOOK_NAME = "diffkit.deepcache"
CAPTURE_HOOK_NAME = "diffkit.deepcache.capture"


def _timestep_value(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


def count_steps_from(timesteps, t0: float) -> int:
    """Noise levels (runs of equal timesteps) from the first occurrence of ``t0`` to the end.

    Falls back to the whole sequence when ``t0`` is not in it.
    """
    values = [float(v) for v in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    start = next((i for i, v in enumerate(values) if v == t0), 0)
    values = values[start:]
    return sum(1 for i, v in enumerate(values) if i == 0 or v != values[i - 1])


@dataclass
class DeepCacheState:
    """Per-trajectory state; cleared by ``reset_state`` (every pipeline call) and on a new trajectory."""

    step: int = -1
    last_timestep: float | None = None
    num_steps: int | None = None
    full: frozenset | None = None  # full steps of the non-uniform schedule (needs num_steps)
    feature: torch.Tensor | None = None
    feature_key: tuple | None = None  # (batch, height, width) of the sample the feature belongs to
    evaluations: list = field(default_factory=list)  # (step, timestep, "full" | "cached")
    partial_residuals_at: float | None = None  # a shallow ControlNet handed out residuals 0..b for this t

    def clear(self) -> None:
        self.__init__()


class _CaptureHook(ModelHook):
    """Keeps the branch's deep feature on full steps (the shallow path never calls this module)."""

    def __init__(self, state: DeepCacheState, source: tuple):
        super().__init__()
        self.state = state
        self.source = source

    def pre_forward(self, module, *args, **kwargs):
        if self.source[0] == "up_block_input":
            self.state.feature = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return args, kwargs

    def post_forward(self, module, output):
        if self.source[0] == "layer_output":
            self.state.feature = output[0] if isinstance(output, tuple) else output
        return output


class DeepCacheHook(ModelHook):
    """Runs each U-Net evaluation in full or through the shallow branch, by the DeepCache schedule."""

    _is_stateful = True

    def __init__(self, config: DeepCacheConfig, plan: BranchPlan, scheduler=None):
        super().__init__()
        self.config = config
        self.plan = plan
        self.scheduler = scheduler
        self.state = DeepCacheState()
        self.controlnets: list = []  # ControlNetModels running their shallow branch with this U-Net

    def reset_state(self, module):
        self.state.clear()
        for net in self.controlnets:
            net._diffusers_hook.get_hook(CONTROLNET_HOOK_NAME).reset_state(net)
        return module

    timestep_value = staticmethod(_timestep_value)

    def _scheduled(self, step: int) -> bool:
        if self.config.schedule == "uniform":
            return step % self.config.interval == 0
        return step in self.state.full

    def predict_full(self, timestep) -> bool:
        """Whether the next evaluation, at ``timestep``, will be full (no state change; for ControlNet)."""
        st, t = self.state, _timestep_value(timestep)
        if st.last_timestep is None or t > st.last_timestep:
            return True
        if t == st.last_timestep:
            return st.evaluations[-1][2] == "full"
        return self._scheduled(st.step + 1) or st.feature is None

    # The decision reads and writes Python state (and syncs on the timestep): keep it out of graphs.
    @torch.compiler.disable
    def _decide(self, sample: torch.Tensor, timestep, call: dict) -> bool:
        st = self.state
        t = _timestep_value(timestep)
        if st.last_timestep is None or t > st.last_timestep:
            if st.last_timestep is not None:
                st.clear()  # a higher noise level than the last evaluation: a new trajectory
            st.step = 0
            if self.scheduler is not None:
                st.num_steps = count_steps_from(self.scheduler.timesteps, t)
            if self.config.schedule != "uniform":
                st.full = frozenset(full_steps(self.config, st.num_steps))
        elif t != st.last_timestep:
            st.step += 1
        st.last_timestep = t
        full = self._scheduled(st.step)
        key = (sample.shape[0], *sample.shape[2:])
        if not full and (st.feature is None or st.feature_key != key or uses_adapter(call)):
            full = True  # nothing usable to reuse (or T2I-Adapter residuals): run in full
        if full and st.partial_residuals_at == t:
            raise RuntimeError(
                "DeepCache: the ControlNet ran its shallow branch for this step but the U-Net cannot reuse its "
                f"cache (batch or size changed from {st.feature_key} to {key}); keep the batch fixed within a run"
            )
        st.partial_residuals_at = None
        if full:
            st.feature_key = key
        st.evaluations.append((st.step, t, "full" if full else "cached"))
        return full

    def new_forward(self, module, *args, **kwargs):
        call = bind_forward_args(args, kwargs)
        if self._decide(call["sample"], call["timestep"], call):
            return self.fn_ref.original_forward(*args, **kwargs)
        return shallow_forward(module, self.plan, self.state.feature, **call)


def _registry(module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def _source_module(unet, plan: BranchPlan):
    if plan.source[0] == "up_block_input":
        return unet.up_blocks[plan.source[1]]
    _, k, i = plan.source
    block = unet.up_blocks[k]
    return block.attentions[i] if hasattr(block, "attentions") else block.resnets[i]


def apply_deepcache(unet, config: DeepCacheConfig | None = None, scheduler=None, controlnet=None,
                    **params) -> DeepCacheConfig:
    """Enable DeepCache on ``unet`` (a ``UNet2DConditionModel``, possibly ``torch.compile``-wrapped).

    ``config`` or the :class:`DeepCacheConfig` fields as keywords (``interval=3, branch=0, ...``).
    ``scheduler``: any object with ``timesteps`` (a diffusers scheduler), read at the start of each
    trajectory by the non-uniform schedule to know the number of steps; required for it. ``controlnet``:
    the ``ControlNetModel`` (or ``MultiControlNetModel``) feeding this U-Net, which then also runs only
    its shallow branch on cached steps (see :mod:`diffkit.cache.controlnet`). Enabling
    again replaces the previous configuration (with the same branch, in place: the hooks stay, so a
    ``torch.compile``d U-Net is not recompiled for a new interval or schedule). Returns the config.
    """
    if config is None:
        config = DeepCacheConfig(**params)
    elif params:
        raise TypeError("pass either a DeepCacheConfig or its fields as keywords, not both")
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a DeepCacheConfig, got {type(config).__name__}")
    unet = check_unet(unet)
    plan = branch_plan(unet, config.branch)
    if config.schedule != "uniform" and scheduler is None:
        raise ValueError(
            "schedule='non-uniform' needs the number of denoising steps: pass scheduler=<your scheduler> "
            "(its timesteps are read at each trajectory start), or use schedule='uniform'"
        )
    nets = [] if controlnet is None else controlnets_of(controlnet)
    for net in nets:
        check_controlnet(net, unet)
    current = _hook(unet)
    if current is not None and current.plan == plan and [id(n) for n in current.controlnets] == [id(n) for n in nets]:
        # Same branch: keep the hooks (a compiled U-Net keeps its graphs), change schedule and scheduler.
        current.config, current.scheduler = config, scheduler
        current.state.clear()
        return config
    remove_deepcache(unet)
    hook = DeepCacheHook(config, plan, scheduler)
    _registry(_source_module(unet, plan)).register_hook(_CaptureHook(hook.state, plan.source), CAPTURE_HOOK_NAME)
    _registry(unet).register_hook(hook, HOOK_NAME)
    _registry(unet).invalidate_child_registries_cache()
    for net in nets:
        _registry(net).register_hook(ShallowControlNetHook(hook), CONTROLNET_HOOK_NAME)
    hook.controlnets = nets
    return config


def _hook(unet) -> DeepCacheHook | None:
    registry = getattr(check_unet(unet), "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_deepcache(unet) -> None:
    """Remove DeepCache from ``unet``; it then computes exactly as before ``apply_deepcache``."""
    unet = check_unet(unet)
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is None:
        return
    hook = registry.get_hook(HOOK_NAME)
    for net in getattr(hook, "controlnets", ()):
        net._diffusers_hook.remove_hook(CONTROLNET_HOOK_NAME, recurse=False)
    registry.remove_hook(HOOK_NAME, recurse=False)
    registry.remove_hook(CAPTURE_HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()


def reset_deepcache(unet) -> None:
    """Forget the cache and step count (start of a new trajectory); pipelines do it at every call."""
    hook = _hook(unet)
    if hook is not None:
        hook.reset_state(unet)


def deepcache_config(unet) -> DeepCacheConfig | None:
    """The config DeepCache runs with on ``unet``, or ``None`` when it is not enabled."""
    hook = _hook(unet)
    return None if hook is None else hook.config


def deepcache_stats(unet) -> dict:
    """What the current/last trajectory ran: ``{"full": n, "cached": m, "evaluations": [(step, t, kind)]}``."""
    hook = _hook(unet)
    if hook is None:
        raise ValueError("DeepCache is not enabled on this U-Net (call apply_deepcache / pipe.enable_deepcache)")
    ev = list(hook.state.evaluations)
    return {
        "full": sum(kind == "full" for *_, kind in ev),
        "cached": sum(kind == "cached" for *_, kind in ev),
        "num_steps": hook.state.num_steps,
        "evaluations": ev,
    }
