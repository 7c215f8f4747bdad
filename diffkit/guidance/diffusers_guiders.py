"""diffusers' guiders (``diffusers.guiders.*Guidance``) on diffkit's classic SD 1.x/2.x and SDXL pipelines.

``pipe(prompt, guidance=PerturbedAttentionGuidance(...))`` wraps the guider in :class:`DiffusersGuidance`
(or pass ``DiffusersGuidance(guider, layers=[...])`` to choose the perturbed U-Net layers). For each U-Net
evaluation of the call the guided call (:mod:`diffkit.pipelines.guided_call`) asks the adapter's per-call
:class:`GuiderSession` to

1. **plan the step**: ``guider.set_state(step, num_inference_steps, timestep)``, then
   ``guider.prepare_inputs({})``, whose batch identifiers name the predictions the guider wants at this
   step (``pred_cond``, ``pred_uncond``, ``pred_cond_skip``, ``pred_cond_seg``); this also runs the
   guider's own per-step bookkeeping (APG's momentum buffer starts afresh at step 0);
2. **extend the U-Net batch** diffusers built, ``[uncond, cond]``, with one more copy of the conditional
   rows when the guider wants a perturbed conditional prediction (PAG, SEG, SkipLayer): every U-Net input
   with the batch's size (sample, text embeddings, SDXL's ``added_cond_kwargs``, ControlNet residuals) gets
   its conditional rows appended;
3. **perturb only those rows**: the guider's perturbation is applied with diffusers' own hook functions
   (``_apply_layer_skip_hook`` for PAG / SkipLayer / AutoGuidance, ``_apply_smoothed_energy_guidance_hook``
   for SEG) on the chosen layers, below a diffkit hook that runs the hooked module on the perturbed rows
   and the module's plain forward on the others. AutoGuidance perturbs the *unconditional* rows (diffusers
   stands in for its weaker model with the same U-Net, some layers dropped, on the negative prompt);
4. **combine**: ``guider.forward(pred_cond=..., pred_uncond=..., pred_cond_skip=...)``; its ``pred`` goes to
   the scheduler's own ``step``. The guider's ``start`` / ``stop`` / ``enabled`` / ``guidance_rescale`` and
   scale-1 rules all live in its ``forward`` and are honoured as they are.

One U-Net evaluation per step (so DeepCache caches the perturbed rows' deep feature like any other rows).
The perturbation hooks are registered once per call and removed when it ends (also on error).

Why not ``guider.prepare_models`` / ``cleanup_models``: they count calls in diffusers' modular loop (one
U-Net call per prediction) to decide when to hook, and in diffusers 0.42 SEG's never fires (it does not
count) and PAG's / SkipLayer's skip the perturbation when CFG is off. diffkit hooks the configured layers
with the same diffusers functions and the guider's own configs instead.

**Layers.** A U-Net layer is a transformer block, ``<path>.transformer_blocks.<i>`` (its self-attention
``<...>.attn1`` names the same layer); what is perturbed inside it follows the guider's config (PAG: the
self-attention map replaced by the identity, i.e. the attention outputs its values; SEG: the self-attention
query blurred; SkipLayer / AutoGuidance: what their ``LayerSkipConfig`` says, by default the whole block).
Where: ``layers=`` if given; else the guider's own config when it names U-Net modules (``fqn`` other than
``"auto"``); else the preset :data:`PRESETS` (diffusers' ``*_layers=[i]`` arguments give ``fqn="auto"``,
which addresses DiT block stacks a U-Net does not have).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    AdaptiveProjectedMixGuidance,
    AutoGuidance,
    BaseGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    LTX2Guidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.hooks import HookRegistry, LayerSkipConfig, ModelHook
from diffusers.hooks.layer_skip import _apply_layer_skip_hook
from diffusers.hooks.smoothed_energy_guidance_utils import (
    SmoothedEnergyGuidanceConfig,
    _apply_smoothed_energy_guidance_hook,
)
from diffusers.utils import is_kornia_available

from .base import Guidance, GuidanceOutput, StepContext

__all__ = [
    "COMBINING",
    "GUIDERS",
    "PERTURBING",
    "PRESETS",
    "DiffusersGuidance",
    "GuiderSession",
    "is_diffusers_guider",
    "make_guider",
    "preset_layers",
    "unet_layers",
]

#: Guiders that only combine the conditional and unconditional predictions.
COMBINING = (
    ClassifierFreeGuidance, AdaptiveProjectedGuidance, AdaptiveProjectedMixGuidance, ClassifierFreeZeroStarGuidance,
    TangentialClassifierFreeGuidance, FrequencyDecoupledGuidance, MagnitudeAwareGuidance,
)


@dataclass(frozen=True)
class _Perturbation:
    """How a perturbing guider is applied: which prediction it perturbs and with which diffusers hook."""

    prediction: str  # the forward() argument of the perturbed prediction
    rows: str  # "extra": appended conditional rows; "uncond": the unconditional rows
    configs_attr: str  # the guider attribute holding its list of configs
    kind: str  # "layer-skip" or "seg"


#: Guiders that perturb the model, and how.
PERTURBING = {
    PerturbedAttentionGuidance: _Perturbation("pred_cond_skip", "extra", "skip_layer_config", "layer-skip"),
    SkipLayerGuidance: _Perturbation("pred_cond_skip", "extra", "skip_layer_config", "layer-skip"),
    SmoothedEnergyGuidance: _Perturbation("pred_cond_seg", "extra", "seg_guidance_config", "seg"),
    AutoGuidance: _Perturbation("pred_uncond", "uncond", "auto_guidance_config", "layer-skip"),
}

#: Layer presets per guider (roles, resolved on the U-Net by :func:`preset_layers`):
#: ``"mid"``: every transformer block of the mid block (SD 1.5 / 2.x: ``mid_block.attentions.0.transformer_blocks.0``,
#: the PAG paper's choice; SDXL: its 10 mid-block blocks, diffusers' PAG-SDXL and the SEG-SDXL default);
#: ``"up"``: the blocks of the first attention of the first up block that has attentions (SD 1.5:
#: ``up_blocks.1.attentions.0.transformer_blocks.0``; SDXL: ``up_blocks.0.attentions.0.transformer_blocks.0-9``).
PRESETS = {
    "PerturbedAttentionGuidance": ("mid",),
    "SmoothedEnergyGuidance": ("mid",),
    "SkipLayerGuidance": ("mid", "up"),
    "AutoGuidance": ("mid",),
}

_UNSUPPORTED = {
    LTX2Guidance: (
        "LTX2Guidance is not supported on SD/SDXL pipelines: it guides LTX-2's video and audio streams and expects "
        "its perturbations (spatio-temporal guidance blocks, modality isolation) to be switched through "
        "LTX2VideoTransformer3DModel forward arguments (spatio_temporal_guidance_blocks, isolate_modalities), "
        "which a U-Net does not have"
    ),
}

ROWS_HOOK = "diffkit.guider.rows"
_HOOK_PREFIX = "diffkit.guider."


def is_diffusers_guider(obj) -> bool:
    return isinstance(obj, BaseGuidance)


# ---------------------------------------------------------------------------------------------------
# U-Net layers
# ---------------------------------------------------------------------------------------------------


def unet_layers(unet) -> list[str]:
    """Every transformer block of the U-Net, ``<path>.transformer_blocks.<i>``, in module order."""
    names = []
    for name, module in unet.named_modules():
        if name.endswith("transformer_blocks") and isinstance(module, torch.nn.ModuleList):
            names += [f"{name}.{i}" for i in range(len(module))]
    return names


def preset_layers(unet, guider_or_name) -> list[str]:
    """The preset layers of a perturbing guider (its class or class name) on this U-Net."""
    name = guider_or_name if isinstance(guider_or_name, str) else type(guider_or_name).__name__
    if name not in PRESETS:
        raise ValueError(f"no layer preset for {name}; presets exist for {', '.join(sorted(PRESETS))}")
    layers = unet_layers(unet)
    out = []
    for role in PRESETS[name]:
        if role == "mid":
            found = [n for n in layers if n.startswith("mid_block.")]
        else:
            ups = sorted({int(n.split(".")[1]) for n in layers if n.startswith("up_blocks.")})
            found = [n for n in layers if ups and n.startswith(f"up_blocks.{ups[0]}.attentions.0.")]
        if not found:
            raise ValueError(f"the {role!r} layers of the {name} preset do not exist in this U-Net; pass layers= "
                             f"(valid layers: {', '.join(layers)})")
        out += found
    return out


def _resolve(unet, names) -> list[tuple[str, int]]:
    """Layer names -> (fqn of the transformer_blocks list, index); unknown names are a ValueError."""
    valid = unet_layers(unet)
    known = set(valid)
    if isinstance(names, str):
        names = [names]
    out = []
    for raw in names:
        name = raw[: -len(".attn1")] if isinstance(raw, str) and raw.endswith(".attn1") else raw
        if name not in known:
            raise ValueError(f"unknown U-Net layer {raw!r}; valid layers (transformer blocks, or their '.attn1' "
                             f"self-attention): {', '.join(valid)}")
        fqn, _, index = name.rpartition(".")
        if (fqn, int(index)) not in out:
            out.append((fqn, int(index)))
    if not out:
        raise ValueError(f"layers= is empty; valid layers: {', '.join(valid)}")
    return out


def _config_locations(unet, config) -> list[tuple[str, int]]:
    indices = [config.indices] if isinstance(config.indices, int) else list(config.indices)
    return _resolve(unet, [f"{config.fqn}.{i}" for i in indices])


# ---------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------


def _main_scale(guider) -> float:
    if isinstance(guider, FrequencyDecoupledGuidance):
        return float(guider.guidance_scales[0])
    return float(getattr(guider, "guidance_scale", 1.0))


class DiffusersGuidance(Guidance):
    """A ``diffusers.guiders`` guider as a diffkit guidance object: ``pipe(prompt, guidance=DiffusersGuidance(g))``.

    ``pipe(prompt, guidance=g)`` with a bare guider wraps it with ``layers=None``. ``layers``: the U-Net
    transformer blocks to perturb (names from :func:`unet_layers`; perturbing guiders only), overriding the
    guider's own locations and the preset. ``scale`` (what ``guidance_scale=`` must agree with, and what
    callbacks read as ``pipe.guidance_scale``) is the guider's ``guidance_scale`` (FDG: its first, highest-
    frequency scale).
    """

    def __init__(self, guider, layers=None):
        if not isinstance(guider, BaseGuidance):
            raise TypeError(f"DiffusersGuidance wraps a diffusers.guiders guider, got {type(guider).__name__}")
        cls = type(guider)
        for unsupported, why in _UNSUPPORTED.items():
            if isinstance(guider, unsupported):
                raise ValueError(why)
        if isinstance(guider, FrequencyDecoupledGuidance) and not is_kornia_available():
            raise ImportError(_KORNIA_MESSAGE)
        spec = _perturbation_of(guider)
        if spec is None and not isinstance(guider, COMBINING):
            wanted = [p for p in (guider._input_predictions or []) if p not in ("pred_cond", "pred_uncond")]
            if wanted:
                raise ValueError(
                    f"{cls.__name__} asks for the predictions {', '.join(wanted)}, which a classic SD/SDXL pipeline "
                    "cannot provide (diffkit provides pred_cond and pred_uncond, and the perturbed predictions of "
                    f"{', '.join(sorted(c.__name__ for c in PERTURBING))})"
                )
        if layers is not None and spec is None:
            raise ValueError(f"layers= is for the guiders that perturb U-Net layers "
                             f"({', '.join(sorted(c.__name__ for c in PERTURBING))}); {cls.__name__} perturbs none")
        self.guider = guider
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        self.scale = _main_scale(guider)

    def __repr__(self) -> str:
        extra = "" if self.layers is None else f", layers={self.layers!r}"
        return f"DiffusersGuidance({type(self.guider).__name__}(guidance_scale={self.scale:g}){extra})"

    @property
    def needs_unconditional(self) -> bool:
        return True  # the guider decides per step (its forward ignores pred_uncond when it does not use it)

    def begin_call(self, pipe) -> GuiderSession:
        """Check the pipeline and hook the perturbed layers for one call (all-or-nothing)."""
        return GuiderSession(self, pipe)

    def __call__(self, pred_uncond, pred_cond, ctx: StepContext, state: dict) -> GuidanceOutput:
        session = state.get("session")
        if session is None:
            raise RuntimeError("DiffusersGuidance runs inside a diffkit pipeline call (pipe(..., guidance=...))")
        return session.combine(pred_uncond, pred_cond)


_KORNIA_MESSAGE = ("FrequencyDecoupledGuidance needs the kornia package (its Laplacian pyramid), which is not "
                   "installed: pip install \"diffkit[guiders]\" (or pip install kornia)")


def _perturbation_of(guider) -> _Perturbation | None:
    for cls, spec in PERTURBING.items():
        if isinstance(guider, cls):
            return spec
    return None


# ---------------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    names: list[str]
    perturb: bool  # this step runs the perturbed rows
    batch: int = 0  # B (one half of diffusers' [uncond, cond] batch)
    extended: bool = False


@dataclass
class _Rows:
    """The batch rows the perturbation applies to at this evaluation (None: no perturbation)."""

    select: tuple[int, int, int] | str | None = None  # (start, stop, total); "all" inside a split


class _RowsHook(ModelHook):
    """On a perturbed module: the hooked forward (diffusers' perturbation) on the selected rows, the plain
    forward on the others; outside a perturbed evaluation, the plain forward only."""

    def __init__(self, plain, rows: _Rows):
        super().__init__()
        self.plain = plain
        self.rows = rows

    def new_forward(self, module, *args, **kwargs):
        select = self.rows.select
        if select is None:
            return self.plain(*args, **kwargs)
        if select == "all":  # inside an outer perturbed module's perturbed rows
            return self.fn_ref.original_forward(*args, **kwargs)
        start, stop, total = select
        if _batch_size(args, kwargs) != total:
            raise RuntimeError(f"diffkit guider: a perturbed module saw a batch of {_batch_size(args, kwargs)} "
                               f"rows, expected {total}")
        parts = []
        try:  # perturbed modules nested in this one follow this split (plain rows plain, perturbed perturbed)
            for lo, hi, fn, inner in ((0, start, self.plain, None), (start, stop, self.fn_ref.original_forward, "all"),
                                      (stop, total, self.plain, None)):
                if hi > lo:
                    a, k = _slice_rows((args, kwargs), lo, hi, total)
                    self.rows.select = inner
                    parts.append(fn(*a, **k))
        finally:
            self.rows.select = select
        return _cat(parts)


def _batch_size(args, kwargs) -> int | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            return v.shape[0]
    return None


def _map_rows(obj, n: int, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.ndim >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, tuple):
        return tuple(_map_rows(v, n, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_rows(v, n, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: _map_rows(v, n, fn) for k, v in obj.items()}
    return obj


def _slice_rows(obj, lo: int, hi: int, n: int):
    return _map_rows(obj, n, lambda t: t[lo:hi])


def _cat(parts):
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in parts]) if isinstance(first[i], torch.Tensor) else first[i]
                     for i in range(len(first)))
    raise TypeError(f"diffkit guider: cannot join module outputs of type {type(first).__name__}")


@dataclass(eq=False, repr=False)
class GuiderSession:
    """Per-call state of a :class:`DiffusersGuidance`: the plan of the current step and the layer hooks."""

    guidance: DiffusersGuidance
    pipe: object
    plan: _Plan | None = None
    rows: _Rows = field(default_factory=_Rows)
    hooked: list = field(default_factory=list)  # modules carrying a _RowsHook
    hook_names: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # the perturbed predictions of the pending step

    def __post_init__(self):
        self.guider = self.guidance.guider
        self.spec = _perturbation_of(self.guider)
        self.unet = self.pipe.unet
        if self.spec is not None:
            self._hook_layers()

    # --- layers -----------------------------------------------------------------------------------
    def _locations(self, config) -> list[tuple[str, int]]:
        if self.guidance.layers is not None:
            return _resolve(self.unet, self.guidance.layers)
        if config.fqn != "auto":
            return _config_locations(self.unet, config)
        return _resolve(self.unet, preset_layers(self.unet, self.guider))

    def _configs(self) -> list:
        """The guider's configs, one per (config, transformer-block list), on the U-Net's own module names.

        Configs placed by ``layers=`` or the preset that differ only in their (DiT) indices are one config:
        each layer is perturbed once.
        """
        out, seen = [], set()
        for config in getattr(self.guider, self.spec.configs_attr):
            by_fqn: dict[str, list[int]] = {}
            for fqn, index in self._locations(config):
                by_fqn.setdefault(fqn, []).append(index)
            for fqn, indices in by_fqn.items():
                c = copy.copy(config)
                c.fqn, c.indices = fqn, indices
                key = repr(sorted(vars(c).items()))
                if key not in seen:
                    seen.add(key)
                    out.append(c)
        return out

    def _check_processors(self, configs) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for c in configs:
            # diffusers' layer skip hooks the attention module (looking its processor up) unless it skips
            # the whole block (skip_attention and skip_ff), which needs no processor
            if self.spec.kind != "layer-skip" or not (c.skip_attention or c.skip_attention_scores) or (
                    c.skip_attention and c.skip_ff):
                continue
            for i in c.indices:
                block = self.unet.get_submodule(f"{c.fqn}.{i}")
                attn = getattr(block, "attn1", None)
                if attn is not None and not isinstance(attn.processor, AttnProcessor2_0):
                    raise ValueError(
                        f"{type(self.guider).__name__} perturbs self-attention with diffusers' layer-skip hooks, "
                        f"which need the SDPA processor AttnProcessor2_0; {c.fqn}.{i}.attn1 uses "
                        f"{type(attn.processor).__name__} (pipe.set_attention_backend('sdpa'))"
                    )

    def _hook_layers(self) -> None:
        configs = self._configs()
        self._check_processors(configs)
        plain = {id(m): m.forward for m in self.unet.modules()}
        try:
            for i, config in enumerate(configs):
                name = f"{_HOOK_PREFIX}{i}"
                self.hook_names.append(name)
                if self.spec.kind == "seg":
                    if not isinstance(config, SmoothedEnergyGuidanceConfig):
                        raise TypeError(f"seg_guidance_config entries must be SmoothedEnergyGuidanceConfig, got "
                                        f"{type(config).__name__}")
                    _apply_smoothed_energy_guidance_hook(self.unet, config, self.guider.seg_blur_sigma, name=name)
                else:
                    if not isinstance(config, LayerSkipConfig):
                        raise TypeError(f"layer configs must be LayerSkipConfig, got {type(config).__name__}")
                    _apply_layer_skip_hook(self.unet, config, name=name)
            for module in self.unet.modules():
                registry = getattr(module, "_diffusers_hook", None)
                if registry is not None and any(n in registry.hooks for n in self.hook_names):
                    registry.register_hook(_RowsHook(plain[id(module)], self.rows), ROWS_HOOK)
                    self.hooked.append(module)
        except BaseException:
            self.close()
            raise
        HookRegistry.check_if_exists_or_initialize(self.unet).invalidate_child_registries_cache()

    def close(self) -> None:
        """Remove every hook this session registered (newest first: diffusers' registry needs that order)."""
        for module in reversed(self.hooked):
            module._diffusers_hook.remove_hook(ROWS_HOOK, recurse=False)
        self.hooked.clear()
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        for name in reversed(self.hook_names):
            registry.remove_hook(name, recurse=True)
        self.hook_names.clear()
        registry.invalidate_child_registries_cache()
        self.rows.select = None

    # --- each U-Net evaluation --------------------------------------------------------------------
    def before_unet(self, args, kwargs, step: int, timestep):
        """Plan the step and extend the U-Net inputs ``[uncond, cond]`` with the rows to perturb."""
        guider = self.guider
        total = getattr(self.pipe, "_num_timesteps", None) or len(self.pipe.scheduler.timesteps)
        guider.set_state(step=step, num_inference_steps=total, timestep=timestep)
        try:
            names = [getattr(b, BaseGuidance._identifier_key) for b in guider.prepare_inputs({})]
        except NotImplementedError:
            names = list(guider._input_predictions)
        perturb = self.spec is not None and self._wants_perturbation(names)
        sample = args[0] if args else kwargs["sample"]
        n = sample.shape[0]
        if n % 2:
            raise RuntimeError("diffkit guidance expected the U-Net batch [uncond, cond]; got an odd batch")
        b = n // 2
        self.plan = _Plan(names, perturb, batch=b)
        if not perturb:
            self.rows.select = None
            return args, kwargs
        if self.spec.rows == "uncond":
            self.rows.select = (0, b, n)
            return args, kwargs
        self.plan.extended = True
        self.rows.select = (n, n + b, n + b)
        return _map_rows((args, kwargs), n, lambda t: torch.cat([t, t[b:n]]))

    def _wants_perturbation(self, names: list[str]) -> bool:
        if self.spec.rows == "uncond":
            return "pred_uncond" in names and self.guider._is_ag_enabled()
        return self.spec.prediction in names

    def after_unet(self, output: torch.Tensor):
        """Split the U-Net output into (uncond, cond, extras) by the step's plan."""
        self.rows.select = None
        b = self.plan.batch
        extras = {}
        if self.plan.extended:
            extras[self.spec.prediction] = output[2 * b:3 * b]
            output = output[:2 * b]
        uncond, cond = output.chunk(2)
        self.extras = extras
        return uncond, cond

    def combine(self, pred_uncond, pred_cond) -> GuidanceOutput:
        kwargs = dict(pred_cond=pred_cond, pred_uncond=pred_uncond)
        kwargs.update(self.extras)
        self.extras = {}
        shape = pred_cond.shape
        flat = isinstance(self.guider, MagnitudeAwareGuidance) and pred_cond.ndim > 3
        if flat:  # its torch.norm(dim=[1, 2, 3]) fails on 4-D latents; (B, C, H*W) changes no norm or value
            kwargs = {k: v.flatten(2) for k, v in kwargs.items()}
        out = self.guider.forward(**kwargs)
        pred = out.pred if hasattr(out, "pred") else out[0]
        return GuidanceOutput(pred.reshape(shape) if flat else pred)


# ---------------------------------------------------------------------------------------------------
# By name (the command line)
# ---------------------------------------------------------------------------------------------------

#: name -> (guider class, the constructor argument the scale sets, its default, fixed arguments)
GUIDERS = {
    "pag": (PerturbedAttentionGuidance, "perturbed_guidance_scale", 3.0,
            dict(perturbed_guidance_layers=[0], perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)),
    "seg": (SmoothedEnergyGuidance, "seg_guidance_scale", 3.0, dict(seg_guidance_layers=[0])),
    "skip-layer": (SkipLayerGuidance, "skip_layer_guidance_scale", 2.8, dict(skip_layer_guidance_layers=[0])),
    "cfg-zero-star": (ClassifierFreeZeroStarGuidance, "guidance_scale", 7.5, {}),
    "tcfg": (TangentialClassifierFreeGuidance, "guidance_scale", 7.5, {}),
    "fdg": (FrequencyDecoupledGuidance, "guidance_scales", 10.0, {}),
    "mambo": (MagnitudeAwareGuidance, "guidance_scale", 10.0, {}),
    "apg-mix": (AdaptiveProjectedMixGuidance, "adaptive_projected_guidance_scale", 10.0, {}),
    # AutoGuidance's "bad model" is the U-Net with its mid-block transformer skipped (dropout 1: always), the
    # guider's own dropout form of Karras et al.'s weaker model; its scale guides away from that model.
    "autoguidance": (AutoGuidance, "guidance_scale", 7.5, dict(auto_guidance_layers=[0], dropout=1.0)),
}


def make_guider(name: str, scale: float | None = None) -> DiffusersGuidance:
    """The diffusers guider ``name`` (a key of :data:`GUIDERS`) with its main scale set, wrapped for diffkit.

    PAG's window is the whole call (every step but the first: diffusers' start bound is strict; its default
    window is 1-20 % of the steps); the
    perturbing guiders use the layer presets. FDG's scale is its high-frequency scale; the low-frequency one
    is half of it (diffusers' default pair is 10 / 5).
    """
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; one of {', '.join(GUIDERS)}")
    cls, arg, default, fixed = GUIDERS[name]
    if cls is FrequencyDecoupledGuidance and not is_kornia_available():
        raise ImportError(_KORNIA_MESSAGE)
    scale = default if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"the scale must be finite, got {scale}")
    value = [scale, scale / 2] if arg == "guidance_scales" else scale
    return DiffusersGuidance(cls(**{arg: value}, **fixed))
