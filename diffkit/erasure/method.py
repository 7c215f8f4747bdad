"""What an erasure method supplies to the shared training loop (``diffkit.erasure.engine``).

A method is a small class: its default hyper-parameters, a check of the job config, an optional
``prepare`` (data it needs, a narrower parameter set such as SalUn's salient tensors), the loss of one
step, an optional ``backward`` (default: one backward pass of that loss) and an optional gradient
transform applied after the backward pass (already all-reduced over processes) and before the
optimiser step. The loop owns everything else: data-parallel processes,
mixed precision, the optimiser, RNG, checkpoints, resume and the artifact.

Register new methods with :func:`register_method`; ``ErasureConfig(method=name)`` then accepts them.
"""

from __future__ import annotations

from typing import ClassVar

import torch

METHODS: dict[str, type[ErasureMethod]] = {}


class ErasureMethod:
    """Base class. Subclasses set ``name`` and ``defaults`` and implement ``loss``."""

    name: ClassVar[str] = ""
    #: Values for the config fields left at None (``parameters``, ``lr``, ``batch_size``).
    defaults: ClassVar[dict] = {}
    #: Keep device copies of the trained tensors' original values, so ``ctx.predict(original=True)``
    #: evaluates the frozen model (ESD's targets). Methods that never need it save the memory.
    needs_original: ClassVar[bool] = True
    #: Method-specific ``config.options`` keys and their defaults.
    option_defaults: ClassVar[dict] = {}

    def __init__(self, config):
        self.config = config
        self.options = {**self.option_defaults, **config.options}

    @classmethod
    def validate(cls, config) -> None:
        """Raise ValueError for a config this method cannot run (called by ``ErasureConfig``)."""
        unknown = sorted(set(config.options) - set(cls.option_defaults))
        if unknown:
            allowed = ", ".join(cls.option_defaults) or "none"
            raise ValueError(f"options {unknown} are not known to method {cls.name!r}; allowed: {allowed}")

    def prepare(self, ctx, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """Called once before training, on the original weights; returns the tensors to train.

        It must be deterministic given ``ctx.prepare_rng`` (it is re-run when a job resumes).
        """
        return params

    def loss(self, ctx) -> tuple[torch.Tensor, dict]:
        """The loss of one step on this process's share of the global batch, and floats to log."""
        raise NotImplementedError

    def backward(self, ctx, loss: torch.Tensor) -> None:
        """Fill the trained parameters' ``.grad`` from ``loss`` (default: one ``accelerator.backward``).

        Methods that combine several gradients (e.g. gradient surgery between an unlearning and a
        preservation loss) override this; gradients are all-reduced over processes by DDP.
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
    if not cls.name:
        raise ValueError("an erasure method needs a name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[ErasureMethod]:
    # The registry imports no method: each registers itself on import, and the package
    # (diffkit/erasure/__init__.py, which runs before any of its modules) imports the built-in ones.
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
