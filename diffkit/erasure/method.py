"""What an erasure method supplies to the shared training loop (``diffkit.erasure.engine``), and the registry.

The registry follows PEFT's tuners: a method *name* maps to a **config class** (a frozen, validated
dataclass of the method's own options, :class:`MethodConfig`) and a **method class**
(:class:`ErasureMethod`). Each method module registers itself with :func:`register_method`; this
module imports none of them (``diffkit/erasure/__init__.py`` imports the built-in ones).

The job (:class:`diffkit.erasure.config.ErasureConfig`) stays one flat mapping for YAML and the command
line: its common fields (concept, anchor, steps, ...), a few historical top-level method fields (``eta``,
``beta``, ``saliency_fraction``, ``mask_guidance``, ``num_images``) and an ``options:`` mapping. The method's
config class names which top-level fields it reads (``job_fields``) and declares the rest as its options;
``ErasureConfig.method_config`` is the typed, validated instance the method uses (``method.cfg``).

A method is a small class: its default hyper-parameters, an optional ``prepare`` (data it needs, a
narrower parameter set such as SalUn's salient tensors), the loss of one step, an optional ``backward``
(default: one backward pass of that loss) and an optional gradient transform applied after the backward
pass (already all-reduced over processes) and before the optimiser step. The loop owns everything else:
data-parallel processes, mixed precision, the optimiser, RNG, checkpoints, resume and the artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

METHODS: dict[str, type[ErasureMethod]] = {}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of a method's typed configuration (subclass it as a frozen dataclass).

    Fields named in ``job_fields`` are read from the job's top-level fields of the same name (they are
    validated there); every other field is an *option*, given in the job's ``options:`` mapping and
    validated by the subclass's ``__post_init__`` (raise ``ValueError`` naming ``options.<name>``).
    """

    #: Top-level ``ErasureConfig`` fields this method reads (kept flat so old job files load unchanged).
    job_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.job_fields)

    @classmethod
    def from_job(cls, job, method: str = "") -> MethodConfig:
        """The typed config of ``job`` (an ``ErasureConfig``): its ``job_fields`` plus ``job.options``."""
        options = job.options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a mapping, got {options!r}")
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"options {unknown} are not known to method {method!r}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
        return cls(**{name: getattr(job, name) for name in cls.job_fields}, **options)

    def options(self) -> dict:
        """The method's options with their resolved values (``job_fields`` excluded)."""
        return {name: getattr(self, name) for name in self.option_names()}


class ErasureMethod:
    """Base class. Subclasses set ``name``, ``config_class`` and ``defaults`` and implement ``loss``."""

    name: ClassVar[str] = ""
    #: The frozen dataclass of the method's own options (``MethodConfig`` subclass).
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: Values for the job fields left at None (``parameters``, ``lr``, ``batch_size``, ``preserve_gradient``).
    defaults: ClassVar[dict] = {}
    #: Keep device copies of the trained tensors' original values, so ``ctx.predict(original=True)``
    #: evaluates the frozen model (ESD's targets). Methods that never need it save the memory.
    needs_original: ClassVar[bool] = True
    #: The method implements ``preserve_gradient`` itself (DoCo's reference rule); otherwise the engine
    #: wraps it in ``diffkit.erasure.surgery.PreserveGradient``.
    own_preserve_gradient: ClassVar[bool] = False
    #: Bumped when the method's training changes for an unchanged job, so ``config_hash`` changes and a
    #: finished artifact of the old algorithm is not silently reused (0: not part of the hash).
    revision: ClassVar[int] = 0
    #: Whether the job may train a LoRA on the selected layers instead (``parametrization: lora``).
    supports_lora: ClassVar[bool] = True
    #: Why not, when ``supports_lora`` is False (the error message's reason).
    lora_refusal: ClassVar[str] = ""
    #: Whether the method runs on SDXL pipelines (two text encoders, size conditioning): true for methods
    #: that reach the models only through ``ctx.embed`` / ``ctx.predict`` and were checked there.
    supports_sdxl: ClassVar[bool] = False

    @classmethod
    def revision_for(cls, config) -> int:
        """The revision that enters ``config``'s hash (a method whose change touched only some jobs narrows it)."""
        return cls.revision

    def __init__(self, config):
        self.config = config
        self.cfg = config.method_config

    @property
    def options(self) -> dict:
        """The method's resolved options (read-only view of ``self.cfg``)."""
        return self.cfg.options()

    @classmethod
    def default_anchor(cls, config) -> str:
        """The anchor of a job that names none (ESD's equation: "")."""
        return ""

    @classmethod
    def validate(cls, config) -> None:
        """Raise ValueError for a job this method cannot run (called by ``ErasureConfig`` after the
        typed config was built; checks that involve several fields live here)."""

    def prepare(self, ctx, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """Called once before training, on the original weights; returns the tensors to train.

        ``ctx.trainable`` holds the candidate tensors meanwhile (so a text encoder among them is in the
        graph of ``ctx.embed``). It must be deterministic given ``ctx.prepare_rng`` (re-run on resume).
        """
        return params

    def loss(self, ctx) -> tuple[torch.Tensor, dict]:
        """The loss of one step on this process's share of the global batch, and floats to log."""
        raise NotImplementedError

    def backward(self, ctx, loss: torch.Tensor) -> None:
        """Fill the trained parameters' ``.grad`` from ``loss`` (default: one ``accelerator.backward``).

        Methods that combine several gradients (e.g. gradient surgery between an unlearning and a
        preservation loss) override this; gradients are all-reduced over processes by DDP. A method may
        leave every ``.grad`` at None: the optimiser then changes nothing (no update, no Adam state).
        """
        ctx.accelerator.backward(loss)

    def transform_gradients(self, ctx, params: dict[str, torch.nn.Parameter]) -> None:
        """Edit ``p.grad`` in place before the optimiser step (default: nothing)."""

    def artifact_masks(self) -> dict[str, torch.Tensor]:
        """Tensors whose change is confined to a mask: the artifact stores only the masked values."""
        return {}

    def state_digest(self) -> str:
        """A short digest of what ``prepare`` computed; a resumed job must reproduce it."""
        return ""

    def summary(self) -> dict:
        """Figures for the artifact's metrics."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method-owned training state for checkpoints (e.g. a discriminator and its optimiser)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned (called on resume, after ``prepare``)."""


def register_method(cls: type[ErasureMethod]) -> type[ErasureMethod]:
    """Register a method class under ``cls.name`` with its config class ``cls.config_class``."""
    if not cls.name:
        raise ValueError("an erasure method needs a name")
    conf = cls.config_class
    if not (isinstance(conf, type) and issubclass(conf, MethodConfig) and dataclasses.is_dataclass(conf)):
        raise ValueError(f"method {cls.name!r}: config_class must be a MethodConfig dataclass, got {conf!r}")
    if not conf.__dataclass_params__.frozen:
        raise ValueError(f"method {cls.name!r}: config_class {conf.__name__} must be a frozen dataclass")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[ErasureMethod]:
    # The registry imports no method: each registers itself on import, and the package
    # (diffkit/erasure/__init__.py, which runs before any of its modules) imports the built-in ones.
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def get_method_config(name: str) -> type[MethodConfig]:
    """The config class registered for method ``name``."""
    return get_method(name).config_class


# --- shared validation helpers for config classes -------------------------------------------------------
def is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_option(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"options.{name} must be {allowed}, got {value!r}")
