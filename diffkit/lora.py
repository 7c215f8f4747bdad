"""A user's LoRA (diffusers' peft backend) as a lifecycle feature: ``pipe.load_lora_weights`` and friends.

diffkit's pipelines keep diffusers' LoRA verbs with diffusers' meaning (``load_lora_weights``,
``fuse_lora``, ``unfuse_lora``, ``set_adapters``, ``delete_adapters``, ``unload_lora_weights``); what they
add is that the adapters are one feature of ``pipe.features`` (kind ``"lora"``, stage "adapters": above the
weights, below attention processors and hooks), so they meet every other feature by
:data:`diffkit.lifecycle.RULES`:

* **checked before loading** (:func:`check_lora_fits`): every module the LoRA adapts must exist in the
  pipeline with the widths of the LoRA's ``A`` / ``B`` matrices, and every rank must be >= 1; a LoRA for
  another base model, one whose targets match nothing, and a missing peft are clear errors, raised before
  anything changes;
* **exact fusing**: ``fuse_lora`` keeps a CPU copy of the weights it changes, so ``unfuse_lora`` puts the
  base weights back bit for bit (diffusers' own subtracts the delta again, off by float round-off);
* **erasure underneath**: an erasure patches the base weights under the LoRA (peft's ``base_layer``; the
  peft layer's ``weight`` is the base layer's parameter, so erasure finds it by its usual name). A fused
  LoRA is *lifted* around an erasure's load and unload (``FeatureKind.lift``: unfused exactly, then fused
  again on the new weights), so the weights are always ``erased W + delta``, bit-identical to fusing on
  the erased model, and removing either feature leaves exactly the state of the other alone;
* **pruning** is refused in both orders (it changes the widths a LoRA's matrices are made for);
* jobs that train the model (``erase``, mask learning) refuse to run with a LoRA attached: they train the
  base model (unload the LoRA; the artifact then loads under it).

``unload_lora_weights`` keeps diffusers' meaning: with the LoRA fused it stays in the weights ("baked in"),
refused while an erasure changed the same tensors; unfused (or ``pipe.features.first("lora").detach()``)
the pipeline is bit-identical to never having loaded it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .artifacts import BaseModelMismatch, config_hash
from .lifecycle import SHARED_STATE, FeatureConflict, FeatureKind, Touch, features_of, register_feature

#: The components a LoRA may adapt, by the prefix of its keys.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PEFT_MISSING = ("loading a LoRA needs peft, the backend of diffusers' LoRA loading, which is not installed: "
                "pip install peft (or pip install 'diffkit[lora]')")

# A LoRA matrix in diffusers' (lora.down / lora.up), peft's (lora_A / lora_B, optionally with an adapter
# name) or the old text-encoder (lora_linear_layer.down / .up) naming, after diffusers' lora_state_dict.
_KEY = re.compile(r"^(?P<comp>unet|text_encoder_2|text_encoder)\.(?P<module>.+?)\."
                  r"(?P<part>lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|lora_linear_layer\.up)"
                  r"(?:\.[^.]+)?\.weight$")


def require_peft() -> None:
    """Raise a clear ImportError unless peft (diffusers' LoRA backend) can be used."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(PEFT_MISSING) from None
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise ImportError(f"{PEFT_MISSING} (diffusers found no usable peft when it was imported)")


def describe_base(pipe, component: str) -> str:
    """The pipeline's base model in words: its name or path and the component's architecture hash."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe, "config", {}).get("_name_or_path")
    module = getattr(pipe, component, None)
    arch = f"{component} config {config_hash(module)}" if module is not None and hasattr(module, "config") else ""
    return f"{name or 'an unnamed pipeline'}{'; ' + arch if arch else ''}"


def _base_layer(module):
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _find_module(component, name: str):
    """The (base) module ``name`` of ``component``; text encoders also under transformers 5's names, which
    dropped CLIPTextModel's ``text_model.`` level that older LoRA files name."""
    for candidate in (name, name[len("text_model."):] if name.startswith("text_model.") else None):
        if candidate:
            try:
                return _base_layer(component.get_submodule(candidate))
            except AttributeError:
                continue
    return None


def check_lora_fits(pipe, state_dict: dict, source: str) -> dict[str, dict[str, int]]:
    """Check a LoRA state dict (diffusers' ``lora_state_dict`` output) against ``pipe``; return the rank of
    every adapted module by component.

    Raises ValueError when it holds no LoRA matrix, when a rank is below 1 or its two matrices disagree, when
    its target modules match nothing in the pipeline, and :class:`~diffkit.artifacts.BaseModelMismatch`
    when a module's widths differ from the LoRA's (a LoRA for another base model), each naming the base.
    """
    pairs: dict[tuple[str, str], dict[str, tuple]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m:
            side = "down" if m["part"].endswith(("down", "A")) else "up"
            pairs.setdefault((m["comp"], m["module"]), {})[side] = tuple(value.shape)
    if not pairs:
        raise ValueError(f"LoRA {source} holds no LoRA matrices for {', '.join(COMPONENTS)} (keys such as "
                         f"'unet.<module>.lora.down.weight' or 'unet.<module>.lora_A.weight')")
    ranks: dict[str, dict[str, int]] = {}
    missing = []
    for (comp, name), shapes in sorted(pairs.items()):
        component = getattr(pipe, comp, None)
        if component is None:
            raise ValueError(f"LoRA {source} adapts a {comp}, which this pipeline ({type(pipe).__name__}) lacks")
        if "down" not in shapes or "up" not in shapes:
            raise ValueError(f"LoRA {source}: {comp}.{name} has only its {'A' if 'down' in shapes else 'B'} matrix")
        down, up = shapes["down"], shapes["up"]
        rank = down[0] if down else 0
        if rank < 1 or len(up) < 2 or up[1] != rank:
            raise ValueError(f"LoRA {source}: {comp}.{name} has rank {rank} (A {list(down)}, B {list(up)}); a "
                             f"LoRA's rank must be >= 1 and the same in A and B")
        module = _find_module(component, name)
        if module is None:
            missing.append(f"{comp}.{name}")
            continue
        if isinstance(module, torch.nn.Linear):
            width_in, width_out, kind = module.in_features, module.out_features, "Linear"
        elif isinstance(module, torch.nn.Conv2d):
            width_in, width_out, kind = module.in_channels, module.out_channels, "Conv2d"
        else:
            raise ValueError(f"LoRA {source} adapts {comp}.{name}, a {type(module).__name__}; LoRAs adapt Linear "
                             f"and Conv2d modules")
        if len(down) < 2 or down[1] != width_in or up[0] != width_out:
            raise BaseModelMismatch(
                f"LoRA {source} was made for another base model: {comp}.{name} is a {kind} {width_in} -> "
                f"{width_out} in this pipeline ({describe_base(pipe, comp)}), the LoRA adapts "
                f"{down[1] if len(down) > 1 else '?'} -> {up[0]}")
        ranks.setdefault(comp, {})[name] = rank
    if missing:
        raise ValueError(f"LoRA {source}: {len(missing)} of its {len(pairs)} target modules match nothing in this "
                         f"pipeline ({describe_base(pipe, missing[0].split('.', 1)[0])}), e.g. {missing[0]}; it "
                         f"was made for another architecture")
    return ranks


# ---------------------------------------------------------------------------------------------------
# The feature
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLoad:
    """One ``load_lora_weights`` call: the source (a folder, a hub id or a state dict) and its arguments."""

    source: object
    adapter_name: str | None = None
    kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "<state dict>" if isinstance(self.source, dict) else str(self.source)


@dataclass
class LoraState:
    """The adapters loaded into a pipeline and what fusing them changed."""

    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> source label
    #: qualified module name -> the base layer's weight (and bias) before fusing, on the CPU
    saved: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)
    #: qualified module name -> peft's per-adapter scaling at fusing (what the fused delta was made with)
    scaling: dict[str, dict[str, float]] = field(default_factory=dict)
    bake: bool = False  # unload_lora_weights with the LoRA fused: leave it in the weights (diffusers' meaning)

    @property
    def fused(self) -> bool:
        return bool(self.saved)


def tuner_layers(pipe) -> Iterator[tuple[str, object]]:
    """``(qualified module name, peft layer)`` of every LoRA layer in the pipeline's components."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if isinstance(model, torch.nn.Module):
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield f"{comp}.{name}", module


def _snapshot(layer) -> dict[str, torch.Tensor | None]:
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    return {"weight": base.weight.detach().to("cpu", copy=True),
            "bias": None if bias is None else bias.detach().to("cpu", copy=True)}


def _restore(layer, saved: dict) -> None:
    base = layer.get_base_layer()
    with torch.no_grad():
        base.weight.copy_(saved["weight"])
        if saved["bias"] is not None:
            base.bias.copy_(saved["bias"])


def _unfuse_exactly(pipe, state: LoraState) -> dict[str, tuple[object, list[str]]]:
    """Put every fused layer's saved base weights back and mark it unmerged; return what was fused."""
    fused = {}
    for q, layer in tuner_layers(pipe):
        if not layer.merged:
            continue
        if q not in state.saved:
            raise FeatureConflict(f"the LoRA layer {q} was fused outside pipe.fuse_lora() (e.g. unet.fuse_lora()), so "
                                  f"its base weights are unknown; unfuse it (pipe.unfuse_lora()) first")
        fused[q] = (layer, list(layer.merged_adapters))
        _restore(layer, state.saved.pop(q))
        layer.merged_adapters.clear()
    return fused


def _fuse_again(state: LoraState, fused: dict[str, tuple[object, list[str]]]) -> None:
    """Merge the layers of ``fused`` again (same adapters, same order, the scaling they were fused with)."""
    for q, (layer, names) in fused.items():
        state.saved[q] = _snapshot(layer)
        current = dict(layer.scaling)
        layer.scaling.update(state.scaling.get(q, {}))
        try:
            layer.merge(adapter_names=names)
        finally:
            layer.scaling.clear()
            layer.scaling.update(current)


def _lift(pipe, state: LoraState):
    fused = _unfuse_exactly(pipe, state) if state.fused else {}
    return lambda: _fuse_again(state, fused)


def _parent(pipe):
    """diffusers' own LoRA verbs of ``pipe`` (skipping diffkit's)."""
    return super(LoraMixin, pipe)


def _load_into(pipe, state: LoraState, load: LoraLoad) -> LoraState:
    require_peft()
    source = repr(load.label)
    parent = _parent(pipe)
    kwargs = dict(load.kwargs)
    src = load.source.copy() if isinstance(load.source, dict) else load.source
    state_dict, _alphas = type(pipe).lora_state_dict(src, **{k: v for k, v in kwargs.items()
                                                            if k not in ("low_cpu_mem_usage", "hotswap")})
    check_lora_fits(pipe, state_dict, source)
    if any(k.startswith("text_encoder") for k in state_dict):
        _require_text_encoder_peft()
    name = load.adapter_name
    if name is None:  # diffusers' own default name, chosen here so that a failed load can be undone by name
        from diffusers.utils.peft_utils import get_adapter_name

        name = get_adapter_name(pipe.unet)
    if name in state.adapters and not kwargs.get("hotswap"):
        raise ValueError(f"a LoRA adapter named {name!r} is already loaded (from {state.adapters[name]}); pass "
                         f"another adapter_name, or pipe.delete_adapters({name!r}) first")
    try:
        parent.load_lora_weights(load.source, adapter_name=name, **kwargs)
    except BaseException:
        if not state.adapters:  # nothing was loaded before: remove whatever the failed load injected
            parent.unload_lora_weights()
        elif name not in state.adapters:
            _delete_quietly(pipe, name)
        raise
    state.adapters[name] = load.label
    return state


def _require_text_encoder_peft() -> None:
    """transformers loads text-encoder LoRAs itself and needs a newer peft than diffusers; say so first."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
        from transformers.utils.peft_utils import check_peft_version
    except ImportError:
        return
    try:
        check_peft_version(min_version=MIN_PEFT_VERSION)
    except ValueError:
        import peft

        raise ImportError(f"this LoRA adapts the text encoder, which transformers loads only with peft >= "
                          f"{MIN_PEFT_VERSION} (installed: {peft.__version__}): pip install -U peft") from None


def _delete_quietly(pipe, name: str) -> None:
    try:
        _parent(pipe).delete_adapters(name)
    except Exception:  # noqa: BLE001 - best effort: the adapter may not have been created at all
        pass


def _attach(pipe, load: LoraLoad) -> LoraState:
    return _load_into(pipe, LoraState(), load)


def _update(pipe, state: LoraState, load: LoraLoad) -> LoraState:
    return _load_into(pipe, state, load)  # like diffusers: another adapter loads unfused, a fused one stays fused


def _detach(pipe, state: LoraState) -> None:
    parent = _parent(pipe)
    if state.bake:  # diffusers' unload with the LoRA fused: the delta stays in the weights
        state.saved.clear()
    else:
        _unfuse_exactly(pipe, state)
    parent.unload_lora_weights()
    pipe.__dict__["_merged_adapters"] = set()
    state.adapters.clear()


def _describe(load: LoraLoad) -> str:
    return repr(load.label) + (f", adapter {load.adapter_name!r}" if load.adapter_name else "")


LORA = register_feature(FeatureKind(
    "lora", Touch.UNET_FORWARD, "adapters", _attach, _detach, update=_update, lift=_lift, describe=_describe,
))


class LoraMixin:
    """diffusers' LoRA verbs as a diffkit feature (see the module docstring); same arguments, same meaning."""

    @property
    def lora_adapters(self) -> dict[str, str]:
        """Adapter name -> where it was loaded from (empty without a LoRA)."""
        feature = features_of(self).first("lora")
        return {} if feature is None else dict(feature.state.adapters)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' ``load_lora_weights``, checked first (:func:`check_lora_fits`) and all-or-nothing."""
        require_peft()
        load = LoraLoad(pretrained_model_name_or_path_or_dict, adapter_name, dict(kwargs))
        features_of(self).attach("lora", load)

    def fuse_lora(self, *args, **kwargs):
        """diffusers' ``fuse_lora``; the weights it changes are kept (CPU) so that ``unfuse_lora`` is exact."""
        feature = features_of(self).first("lora")
        if feature is None:
            return super().fuse_lora(*args, **kwargs)
        state = feature.state
        before = {q: layer for q, layer in tuner_layers(self) if q not in state.saved}
        snapshots = {q: _snapshot(layer) for q, layer in before.items()}
        super().fuse_lora(*args, **kwargs)
        for q, layer in tuner_layers(self):
            if layer.merged:
                if q in snapshots:
                    state.saved[q] = snapshots[q]
                state.scaling[q] = dict(layer.scaling)

    def unfuse_lora(self, *args, **kwargs):
        """diffusers' ``unfuse_lora``, exact: the base weights are the ones from before ``fuse_lora``."""
        super().unfuse_lora(*args, **kwargs)
        feature = features_of(self).first("lora")
        if feature is None:
            return
        state = feature.state
        for q, layer in tuner_layers(self):
            if q in state.saved and not layer.merged:
                _restore(layer, state.saved.pop(q))
                state.scaling.pop(q, None)

    def delete_adapters(self, adapter_names):
        """diffusers' ``delete_adapters``; deleting the last adapter unloads the LoRA exactly."""
        feature = features_of(self).first("lora")
        if feature is None:
            return super().delete_adapters(adapter_names)
        if feature.state.fused:
            raise FeatureConflict("delete_adapters() with a fused LoRA would leave its delta in the weights; call "
                                  "pipe.unfuse_lora() first")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in feature.state.adapters]
        if unknown:
            raise ValueError(f"no LoRA adapter named {unknown[0]!r}; loaded: {', '.join(feature.state.adapters)}")
        if set(names) >= set(feature.state.adapters):
            feature.detach()
            return None
        super().delete_adapters(names)
        for n in names:
            feature.state.adapters.pop(n, None)
        return None

    def unload_lora_weights(self, *args, **kwargs):
        """diffusers' ``unload_lora_weights``: exact when the LoRA is not fused; a fused one stays in the
        weights (diffusers' meaning), refused while an erasure or pruning changed the same tensors."""
        fs = features_of(self)
        feature = fs.first("lora")
        if feature is None:
            return super().unload_lora_weights(*args, **kwargs)
        state = feature.state
        if state.fused:
            fused = {q for q in state.saved}
            for other in fs:
                if other is feature or not other.touches & SHARED_STATE:
                    continue
                names = getattr(other.state, "tensor_names", None)
                if names is None or any(n.rpartition(".")[0] in fused for n in names):
                    raise FeatureConflict(
                        f"unload_lora_weights() with the LoRA fused would bake it into weights {other.label} "
                        f"changed; call pipe.unfuse_lora() first (then unloading is exact), or detach "
                        f"{other.label} first")
            state.bake = True
        feature.detach()
        return None
