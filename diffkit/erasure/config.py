"""The erasure job: one frozen, validated dataclass, built in Python or read from YAML.

Fields left at ``None`` take the method's default (``ErasureMethod.defaults``: ESD trains the
cross-attention with batch 1, SalUn trains the salient half of the U-Net with batch 8), so a job file
names only what it changes.

The job stays flat (the format job files have always had); the method's own options are typed:
``config.method_config`` is the frozen, validated dataclass registered for ``config.method``
(``ESDConfig``, ``SalUnConfig``, ``AdvUnlearnConfig``, ``DoCoConfig``), built from the method's top-level
fields and the ``options:`` mapping. Unknown option keys are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .method import MethodConfig, get_method

MIXED_PRECISION = ("no", "fp16", "bf16")
PARAMETRIZATIONS = ("full", "lora")
_LORA_FIELDS = ("parametrization", "lora_rank", "lora_alpha")


def _as_prompts(value, name: str, allow_empty: bool) -> tuple[str, ...]:
    if value is None:
        value = ()
    if isinstance(value, str):
        value = (value,)
    try:
        prompts = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}") from None
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"{name} must hold strings, got {p!r}")
        if not allow_empty and not p.strip():
            raise ValueError(f"{name} must not contain empty prompts, got {prompts!r}")
    return prompts


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, integer=False, allowed: str = "") -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        want = allowed if integer else f"a finite number {allowed}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class _MethodDefault:
    """The default of ``anchor``: "the method's choice" (ESD: "", SalUn: a substitute concept)."""

    def __repr__(self) -> str:
        return "<the method's default>"


METHOD_DEFAULT = _MethodDefault()


@dataclass(frozen=True)
class ErasureConfig:
    """An erasure job.

    concept: the prompt(s)/word(s) to erase (c in ESD's and SalUn's losses); one is drawn per sample.
    anchor: what the concept should turn into: ESD's target is eps(x_t, anchor) - eta (eps(x_t, c) -
        eps(x_t, "")) (anchor "" is the paper's equation); SalUn's substitute prompt; DoCo's anchor
        concept. Unset: the method's default (``ErasureMethod.default_anchor``: "" for ESD, AdvUnlearn and
        DoCo; SalUn: the first retain prompt, the reference code's "another class").
    retain_prompts: prompts whose behaviour must be kept (SalUn's retain set, part 2's utility loss).
    parameters: a preset of ``diffkit.erasure.selection.PRESETS`` or a list of regular expressions over
        qualified names such as ``unet.down_blocks.0...attn2.to_k.weight``; None = the method's default.
    steps, lr, batch_size, seed: optimisation (Adam, global batch over all processes).
    eta: ESD's negative-guidance strength (1 in the paper's reference code; also AdvUnlearn's ESD loss).
    beta: SalUn's weight of the retain diffusion loss; saliency_fraction: share of weights SalUn updates;
    mask_guidance: the guidance scale in SalUn's saliency loss (7.5 in the reference code).
    sample_steps, sample_guidance: the original model's DDIM sampling that produces ESD's x_t and
        SalUn's forget/retain images; num_images: size of SalUn's forget and retain image sets (DoCo: its
        anchor images; the concept-preserving gradient's prior images).
    resolution: image side in pixels (default: the U-Net's native size).
    checkpoint_every: steps between checkpoints; mixed_precision / gradient_checkpointing: accelerate.
    preserve_gradient: concept-preserving gradient surgery (``diffkit.erasure.surgery``) on the method's
        unlearning gradient against a preservation gradient on retain prompts; None = the method's default.
    options: the method's own options (``method_config``'s fields that are not top-level fields);
        unknown keys are an error listing the valid ones.
    parametrization: "full" trains the selected tensors themselves; "lora" trains a LoRA (rank
        ``lora_rank``, scale ``lora_alpha / lora_rank``; alpha defaults to the rank) on every Linear /
        Conv2d layer among them (a preset's other tensors, e.g. layer norms, stay frozen; listed ones are
        an error) (``diffkit.erasure.lora_param``), and the artifact is a diffusers LoRA file.
    """

    method: str = "esd"
    concept: tuple[str, ...] = ()
    anchor: str = METHOD_DEFAULT  # type: ignore[assignment]
    retain_prompts: tuple[str, ...] = ()
    parameters: str | tuple[str, ...] | None = None
    steps: int = 200
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    eta: float = 1.0
    beta: float = 0.5
    saliency_fraction: float = 0.5
    mask_guidance: float = 7.5
    sample_steps: int = 50
    sample_guidance: float = 3.0
    num_images: int = 8
    resolution: int | None = None
    checkpoint_every: int = 50
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    preserve_gradient: bool | None = None
    options: Mapping = field(default_factory=dict)
    parametrization: str = "full"
    lora_rank: int = 4
    lora_alpha: float | None = None

    def __post_init__(self):
        method = get_method(self.method)  # raises for an unknown method
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("concept", _as_prompts(self.concept, "concept", allow_empty=False))
        if not self.concept:
            raise ValueError("concept must name at least one prompt or word to erase, got none")
        if self.anchor is not METHOD_DEFAULT and not isinstance(self.anchor, str):
            raise ValueError(f"anchor must be a string, got {self.anchor!r}")
        set_("retain_prompts", _as_prompts(self.retain_prompts, "retain_prompts", allow_empty=False))
        for key, value in method.defaults.items():
            if getattr(self, key) is None:
                set_(key, value)
        self._check_parameters()
        _check_range("steps", self.steps, lo=1, integer=True, allowed="an integer >= 1")
        _check_range("lr", self.lr, lo=0, lo_open=True, allowed="> 0")
        _check_range("batch_size", self.batch_size, lo=1, integer=True, allowed="an integer >= 1")
        _check_range("seed", self.seed, lo=0, hi=2**63 - 1, integer=True, allowed="an integer in [0, 2**63)")
        _check_range("eta", self.eta, lo=0, lo_open=True, allowed="> 0")
        _check_range("beta", self.beta, lo=0, allowed=">= 0")
        _check_range("saliency_fraction", self.saliency_fraction, lo=0, hi=1, lo_open=True, allowed="in (0, 1]")
        _check_range("mask_guidance", self.mask_guidance, lo=0, allowed=">= 0")
        _check_range("sample_steps", self.sample_steps, lo=1, hi=1000, integer=True, allowed="an integer in [1, 1000]")
        _check_range("sample_guidance", self.sample_guidance, lo=0, allowed=">= 0")
        _check_range("num_images", self.num_images, lo=1, integer=True, allowed="an integer >= 1")
        if self.resolution is not None:
            _check_range("resolution", self.resolution, lo=8, integer=True, allowed="an integer >= 8 (pixels)")
        _check_range("checkpoint_every", self.checkpoint_every, lo=1, integer=True, allowed="an integer >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.preserve_gradient is None:
            set_("preserve_gradient", False)
        if not isinstance(self.preserve_gradient, bool):
            raise ValueError(f"preserve_gradient must be true or false, got {self.preserve_gradient!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping, got {self.options!r}")
        set_("options", dict(self.options))
        self._check_parametrization(method)
        set_("_method_config", method.config_class.from_job(self, method.name))
        method.validate(self)
        if self.anchor is METHOD_DEFAULT:
            set_("anchor", method.default_anchor(self))

    @property
    def method_config(self) -> MethodConfig:
        """The method's typed, validated options (its registered ``config_class``)."""
        return self._method_config

    def _check_parametrization(self, method) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        _check_range("lora_rank", self.lora_rank, lo=1, integer=True, allowed="an integer >= 1")
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        _check_range("lora_alpha", self.lora_alpha, lo=0, lo_open=True, allowed="> 0")
        if self.parametrization == "lora" and not method.supports_lora:
            raise ValueError(f"method {method.name!r} cannot be LoRA-parametrised: {method.lora_refusal}")

    def _check_parameters(self) -> None:
        from .selection import PRESETS

        p = self.parameters
        if isinstance(p, str):
            if p not in PRESETS:
                raise ValueError(f"parameters must be one of {sorted(PRESETS)} or a list of regular expressions, "
                                 f"got {p!r}")
            return
        patterns = _as_prompts(p, "parameters", allow_empty=False)
        if not patterns:
            raise ValueError("parameters must be a preset name or a non-empty list of regular expressions")
        for pat in patterns:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"parameters: invalid regular expression {pat!r}: {e}") from None
        object.__setattr__(self, "parameters", patterns)

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping, **overrides) -> ErasureConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys are an error naming the allowed ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an erasure job must be a mapping of fields, got {type(data).__name__}")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown erasure job field(s) {unknown}; allowed: {', '.join(cls.field_names())}")
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ErasureConfig:
        """Read a YAML job file; keyword overrides (None = not given) win over the file."""
        return cls.from_dict(read_yaml(path), **overrides)

    def replace(self, **changes) -> ErasureConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def config_hash(self) -> str:
        """Hash of everything that determines the trained weights (not the checkpoint interval)."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        if not d["preserve_gradient"]:
            d.pop("preserve_gradient")  # jobs from before the option keep their hash
        if d["parametrization"] == "full":
            for key in _LORA_FIELDS:  # full-rank jobs from before LoRA keep their hash
                d.pop(key)
        revision = get_method(self.method).revision_for(self)
        if revision:  # the method's training changed for an unchanged job: do not reuse old artifacts
            d["method_revision"] = revision
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_yaml(path: str | Path) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read job file {str(path)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"job file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"job file {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data
