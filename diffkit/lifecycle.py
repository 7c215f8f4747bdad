"""One feature lifecycle: every diffkit feature attaches, composes and detaches the same way.

A **feature kind** (:class:`FeatureKind`) is registered by the package that implements it (DeepCache
in ``diffkit.cache``, pruning in ``diffkit.pruning``, erasure in ``diffkit.erasure``, a user's LoRA in
``diffkit.lora``, the attention backend in ``diffkit.attention``, per-call guidance in
``diffkit.pipelines``); this module imports none of them (PEFT's tuner registry is the model). A kind declares

* what it **touches** (:class:`Touch`: U-Net forward, U-Net weights, U-Net structure, text-encoder
  weights, scheduler step, attention processors),
* its **stage** (:data:`STAGES`): the order in which features stack on a model — structure, then
  weights, then adapters (a LoRA), then attention processors, then forward hooks, then per-call guidance,
* ``attach(pipe, config) -> state`` (all-or-nothing: on error it leaves the pipeline as it found it)
  and ``detach(pipe, state)`` (exact: the pipeline computes as if the feature had never been attached),
* whether it can be re-attached with the same config (``reattachable``: a hook or a processor) and
  whether several may be attached at once (``multiple``: erasure artifacts on disjoint tensors).

``pipe.features`` (a :class:`FeatureSet`) lists the attached :class:`Feature` handles in attach order,
and is the one place that decides how two features meet (:data:`RULES`, :func:`rule_for`):

* **compose**: both stay attached. When the new feature's stage is *below* an attached reattachable
  one (pruning while DeepCache is on), the set detaches those, attaches the new one and re-attaches
  them, so hooks always sit on the final modules. Weight/structure features that cannot be re-attached
  meet through two questions the set answers for every feature: :meth:`FeatureSet.base_value` (the
  base model's value of a tensor, before any feature) and :meth:`FeatureSet.resolve` (where a tensor of
  the unpruned model lives now, and how its values map there).
* **refuse**: a :class:`FeatureConflict` naming both features and what to do.

Detaching is reverse order among features that share weights or structure (:meth:`FeatureSet.detach`
says which feature to detach first). Jobs that train on the pipeline (``erase``, mask learning) call
:meth:`FeatureSet.suspended` to run without the forward-changing features and restore them afterwards.
The pipeline call owns per-call state: :meth:`FeatureSet.begin_call` resets every stateful feature.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class Touch(enum.Flag):
    """What a feature changes."""

    NOTHING = 0
    UNET_FORWARD = enum.auto()
    UNET_WEIGHTS = enum.auto()
    UNET_STRUCTURE = enum.auto()
    TEXT_ENCODER_WEIGHTS = enum.auto()
    SCHEDULER_STEP = enum.auto()
    ATTENTION_PROCESSORS = enum.auto()


#: Touches whose features must be detached in reverse order of attaching.
SHARED_STATE = Touch.UNET_WEIGHTS | Touch.UNET_STRUCTURE | Touch.TEXT_ENCODER_WEIGHTS

#: "adapters": layers wrapped around weight-holding modules (a user's LoRA through diffusers' peft backend).
STAGES = {"structure": 0, "weights": 1, "adapters": 2, "processors": 3, "forward": 4, "call": 5}


class FeatureConflict(ValueError):
    """Two features that do not compose (the message names both and what to do)."""


@dataclass(frozen=True)
class FeatureKind:
    name: str
    touches: Touch
    stage: str
    attach: Callable[[Any, Any], Any]
    detach: Callable[[Any, Any], None]
    reattachable: bool = False
    multiple: bool = False
    describe: Callable[[Any], str] = repr  # config -> a short label for listings and errors
    #: ``update(pipe, state, config) -> state``: change an attached feature's config in place (DeepCache
    #: keeps its hooks, so a compiled U-Net keeps its graphs); without it, attach detaches and re-attaches.
    update: Callable[[Any, Any, Any], Any] | None = None
    #: ``lift(pipe, state) -> put_back``: take what this feature folded into the weights of lower stages off
    #: them exactly, and return a function that folds it in again (a fused LoRA: unfused exactly, then fused
    #: again on the new weights), so a lower-stage feature can attach or detach underneath it. Unlike
    #: ``reattachable`` features, a liftable one is lifted wherever it sits in the attach order.
    lift: Callable[[Any, Any], Callable[[], None]] | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {tuple(STAGES)}, got {self.stage!r}")


_KINDS: dict[str, FeatureKind] = {}


def register_feature(kind: FeatureKind) -> FeatureKind:
    """Register a feature kind (each feature package does this for itself, on import)."""
    _KINDS[kind.name] = kind
    return kind


def feature_kind(name: str) -> FeatureKind:
    if name not in _KINDS:
        raise ValueError(f"unknown feature {name!r}; registered: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


# ---------------------------------------------------------------------------------------------------
# How two features meet: one table
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``compose`` (with the order that makes it exact) or ``refuse`` (with what to do instead)."""

    verdict: str  # "compose" | "refuse"
    how: str


def _c(how: str) -> Rule:
    return Rule("compose", how)


def _r(how: str) -> Rule:
    return Rule("refuse", how)


#: Every pair of feature kinds (unordered). A pair missing here is refused (a new kind must say).
RULES: dict[frozenset, Rule] = {
    frozenset({"guidance", "deepcache"}): _c("guidance combines the predictions DeepCache's cached steps return"),
    frozenset({"guidance", "pruning"}): _c("guidance runs on the slimmed U-Net"),
    frozenset({"guidance", "erasure"}): _c("guidance runs on the erased weights"),
    frozenset({"guidance", "attention"}): _c("independent (processors vs the step)"),
    frozenset({"deepcache", "pruning"}): _c("pruning slims first; DeepCache's hooks are re-attached on the slim "
                                            "modules"),
    frozenset({"deepcache", "erasure"}): _c("erasure patches weights in place; the hooks see the erased weights"),
    frozenset({"deepcache", "attention"}): _c("processors are set below DeepCache's hooks; the hooks are "
                                              "re-attached"),
    frozenset({"pruning", "erasure"}): _c("either order: pruning slices the live (erased) weights; an erasure "
                                          "loaded after pruning is sliced to the kept units; detach in reverse "
                                          "order"),
    frozenset({"pruning", "attention"}): _c("pruning slims first; the backend is re-applied to the slim "
                                            "attention modules"),
    frozenset({"erasure", "attention"}): _c("independent (weights vs processors)"),
    frozenset({"erasure"}): _c("several erasures stack on disjoint tensors; overlapping ones are refused"),
    frozenset({"lora", "guidance"}): _c("guidance combines the predictions of the U-Net with its LoRA"),
    frozenset({"lora", "deepcache"}): _c("DeepCache's shallow forward runs the LoRA layers it calls (and the call's "
                                         "LoRA scale)"),
    frozenset({"lora", "pruning"}): _r("pruning changes the widths of the modules a LoRA adapts; load the LoRA on the "
                                       "unpruned pipeline (pipe.unload_pruning()) or unload it first "
                                       "(pipe.unload_lora_weights())"),
    frozenset({"lora", "erasure"}): _c("either order: erasure patches the base weights under the LoRA; a fused LoRA is "
                                       "unfused exactly and fused again around an erasure's load and unload, so the "
                                       "weights are always the erased ones plus the LoRA's delta"),
    frozenset({"lora", "attention"}): _c("independent: the LoRA wraps linear layers, the processors call them"),
}


def rule_for(a: str, b: str) -> Rule:
    key = frozenset({a, b})
    if key in RULES:
        return RULES[key]
    return _r(f"{a} and {b} have no composition rule")


# ---------------------------------------------------------------------------------------------------
# Handles and the per-pipeline set
# ---------------------------------------------------------------------------------------------------


class Feature:
    """A handle on one attached feature; :meth:`detach` removes it (exactly)."""

    def __init__(self, kind: FeatureKind, config, owner: FeatureSet):
        self.kind = kind
        self.config = config
        self.state = None
        self._owner = weakref.ref(owner)

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def touches(self) -> Touch:
        """What this instance changes (an erasure artifact may touch only the text encoder)."""
        own = getattr(self.state, "touches", None)
        return own if isinstance(own, Touch) else self.kind.touches

    @property
    def attached(self) -> bool:
        owner = self._owner()
        return owner is not None and any(f is self for f in owner)

    def detach(self) -> None:
        owner = self._owner()
        if owner is None or not self.attached:
            raise RuntimeError(f"{self.label} is not attached")
        owner.detach(self)

    @property
    def label(self) -> str:
        return f"{self.kind.name}({self.kind.describe(self.config)})"

    def __repr__(self) -> str:
        return f"<Feature {self.label}>"


class FeatureSet:
    """The features attached to one pipeline, in attach order (``pipe.features``)."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)
        self._features: list[Feature] = []

    # --- listing ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Feature]:
        return iter(list(self._features))

    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, i) -> Feature:
        return self._features[i]

    def __repr__(self) -> str:
        return f"FeatureSet([{', '.join(f.label for f in self._features)}])"

    def of(self, name: str) -> list[Feature]:
        return [f for f in self._features if f.kind.name == name]

    def first(self, name: str) -> Feature | None:
        found = self.of(name)
        return found[0] if found else None

    @property
    def pipe(self):
        pipe = self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline of this feature set no longer exists")
        return pipe

    # --- attach / detach --------------------------------------------------------------------------
    def check(self, name: str) -> FeatureKind:
        """Raise :class:`FeatureConflict` unless a ``name`` feature composes with everything attached."""
        kind = feature_kind(name)
        for f in self._features:
            if f.kind.name == name and not kind.multiple:
                continue  # replaced by attach()
            rule = rule_for(f.kind.name, name)
            if rule.verdict == "refuse":
                raise FeatureConflict(f"{name} cannot be combined with the attached {f.label}: {rule.how}")
        return kind

    def attach(self, name: str, config) -> Feature:
        """Attach a feature (replacing an attached one of the same kind unless it is ``multiple``)."""
        kind = self.check(name)
        if not kind.multiple:
            current = self.first(name)
            if current is not None and kind.update is not None:
                current.state = kind.update(self.pipe, current.state, config)
                current.config = config
                return current
            for old in self.of(name):
                self.detach(old)
        lifted = [f for f in self._features if f.kind.reattachable and STAGES[f.kind.stage] > STAGES[kind.stage]]
        with self._lifted(lifted), self._unfolded(kind, None):
            feature = Feature(kind, config, self)
            feature.state = kind.attach(self.pipe, config)  # all-or-nothing by contract
            self._features.append(feature)
        return feature

    def detach(self, feature: Feature) -> None:
        if not any(f is feature for f in self._features):
            raise RuntimeError(f"{feature.label} is not attached to this pipeline")
        i = next(i for i, f in enumerate(self._features) if f is feature)
        shared = feature.touches & SHARED_STATE
        for later in self._features[i + 1:]:
            if later.kind.name != feature.kind.name and later.touches & shared:
                raise FeatureConflict(f"detach {later.label} before {feature.label}: it was attached later and "
                                      f"changes the same {_names(later.touches & shared)}")
        lifted = [f for f in self._features[i + 1:]
                  if f.kind.reattachable and STAGES[f.kind.stage] > STAGES[feature.kind.stage]]
        with self._lifted(lifted), self._unfolded(feature.kind, feature):
            feature.kind.detach(self.pipe, feature.state)
            self._features.remove(feature)

    def record(self, name: str, config, state) -> Feature:
        """Record a feature a job already applied in place (the erasure trainer), so it detaches like any."""
        kind = self.check(name)
        feature = Feature(kind, config, self)
        feature.state = state
        self._features.append(feature)
        return feature

    def detach_all(self, name: str | None = None) -> int:
        """Detach every feature (of kind ``name``), newest first; return how many."""
        todo = [f for f in self._features if name is None or f.kind.name == name]
        for f in reversed(todo):
            self.detach(f)
        return len(todo)

    @contextlib.contextmanager
    def _lifted(self, features: list[Feature]):
        """Temporarily detach reattachable features (newest first), re-attach them (oldest first)."""
        pipe = self.pipe
        for f in reversed(features):
            f.kind.detach(pipe, f.state)
        try:
            yield
        finally:
            for f in features:
                f.state = f.kind.attach(pipe, f.config)

    @contextlib.contextmanager
    def _unfolded(self, kind: FeatureKind, skip: Feature | None):
        """Lift every liftable feature above ``kind``'s stage (any position; newest first), put them back after."""
        put_back = []
        try:
            for f in reversed(self._features):
                if f is not skip and f.kind.lift is not None and STAGES[f.kind.stage] > STAGES[kind.stage]:
                    put_back.append(f.kind.lift(self.pipe, f.state))
            yield
        finally:
            for again in reversed(put_back):
                again()

    @contextlib.contextmanager
    def suspended(self, touches: Touch, job: str):
        """Run ``job`` without the features that touch ``touches``; re-attach them afterwards.

        Only reattachable features can be suspended; another one raises a :class:`FeatureConflict`.
        """
        hit = [f for f in self._features if f.touches & touches]
        fixed = [f for f in hit if not f.kind.reattachable]
        if fixed:
            raise FeatureConflict(f"{job} cannot run with {fixed[0].label} attached (it changes the "
                                  f"{_names(fixed[0].touches & touches)}); detach it first")
        with self._lifted(hit):
            saved = [f for f in self._features if f in hit]
            self._features = [f for f in self._features if f not in hit]
            try:
                yield
            finally:
                self._features = [f for f in self._features if f not in saved] + saved

    def refuse(self, names: tuple[str, ...], job: str, what_to_do: str) -> None:
        """Raise a :class:`FeatureConflict` if a feature of one of ``names`` is attached."""
        for f in self._features:
            if f.kind.name in names:
                raise FeatureConflict(f"{job} cannot run with {f.label} attached; {what_to_do}")

    # --- per call ---------------------------------------------------------------------------------
    def begin_call(self) -> None:
        """Reset per-call state of every stateful feature (the pipeline call does this first)."""
        for f in self._features:
            reset = getattr(f.state, "reset", None)
            if callable(reset):
                reset()

    @contextlib.contextmanager
    def attached_for_call(self, name: str, config):
        """Attach a per-call feature (guidance) for the duration of a ``with`` block."""
        feature = self.attach(name, config)
        try:
            yield feature
        finally:
            if feature in self._features:
                self.detach(feature)

    # --- how weight and structure features see each other -----------------------------------------
    def base_value(self, q: str):
        """The base model's value of qualified tensor ``q`` (before any attached feature changed it).

        The oldest feature that holds an original of ``q`` knows it; else it is the live parameter.
        """
        for f in self._features:
            original = getattr(f.state, "original", None)
            value = original(q) if callable(original) else None
            if value is not None:
                return value
        return _live_parameter(self.pipe, q)

    def resolve(self, q: str):
        """Where tensor ``q`` of the unmodified model lives now: ``(parameter or None, select)``.

        ``select(full_value)`` maps a full-size value onto the live parameter (identity unless a
        structure feature sliced it); ``None`` means the tensor no longer exists (a removed module).
        """
        for f in self._features:
            resolver = getattr(f.state, "resolve", None)
            if callable(resolver):
                found = resolver(q)
                if found is not None:
                    return found
        return _live_parameter(self.pipe, q), _identity


def _identity(x):
    return x


def _live_parameter(pipe, q: str):
    component, _, name = q.partition(".")
    module = getattr(pipe, component, None)
    if module is None:
        raise KeyError(q)
    return module.get_parameter(name)


def _names(touches: Touch) -> str:
    return ", ".join(t.name.lower().replace("_", " ") for t in Touch if t and t in touches and t.value)


def features_of(pipe) -> FeatureSet:
    """The pipeline's :class:`FeatureSet` (created on first use)."""
    fs = pipe.__dict__.get("_diffkit_features")
    if fs is None or fs._pipe() is not pipe:
        fs = FeatureSet(pipe)
        pipe.__dict__["_diffkit_features"] = fs
    return fs


def composition_matrix(kinds: tuple[str, ...] | None = None) -> str:
    """The pair matrix as a markdown table (docs/architecture.md is generated from it)."""
    kinds = kinds or tuple(sorted(_KINDS))
    rows = ["| | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for a in kinds:
        cells = []
        for b in kinds:
            if a == b and not _KINDS[a].multiple:
                cells.append("replaces")
            else:
                cells.append(rule_for(a, b).verdict)
        rows.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def composition_rules(kinds: tuple[str, ...] | None = None) -> str:
    """Each pair's rule as a markdown list (verdict and how), in the order of ``kinds``."""
    kinds = kinds or tuple(sorted(_KINDS))
    lines = []
    for i, a in enumerate(kinds):
        for b in kinds[i:]:
            if a == b and not _KINDS[a].multiple:
                continue
            rule = rule_for(a, b)
            pair = a if a == b else f"{a} + {b}"
            lines.append(f"- **{pair}**: {rule.verdict}: {rule.how}")
    return "\n".join(lines)
