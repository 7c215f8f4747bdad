"""Pruning as a lifecycle feature, and the pipeline verbs ``load_pruning`` / ``unload_pruning``.

The feature kind ``"pruning"`` touches the U-Net's structure and weights (stage "structure"; not
reattachable). Its state answers the lifecycle's two questions for the modules it replaced:
``original(q)`` (the full-size base value, from the kept original modules) and ``resolve(q)`` (the
slim parameter a full-size tensor maps to, and the index selection that maps it), so an erasure
loaded after pruning is sliced to the kept units and checked against the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..lifecycle import FeatureConflict, FeatureKind, Touch, features_of, register_feature
from .surgery import ParameterMap, select


@dataclass(frozen=True)
class PruningLoad:
    """What ``load_pruning`` was asked for."""

    directory: str
    keep_original: bool = True


class PruningState:
    def __init__(self, unet, spec, originals: dict[str, torch.nn.Module] | None, maps: dict[str, ParameterMap],
                 directory: str = "?"):
        self.unet = unet
        self.directory = directory
        self.spec = spec
        self.originals = originals
        self.maps = maps

    def _split(self, q: str) -> tuple[str, str] | None:
        if not q.startswith("unet."):
            return None
        name = q[len("unet."):]
        for module in self.maps:
            if name.startswith(module + "."):
                return module, name[len(module) + 1:]
        return None

    def original(self, q: str):
        hit = self._split(q)
        if hit is None:
            return None
        if self.originals is None:
            raise FeatureConflict(f"the pruning spec {self.directory!r} was loaded with keep_original=False, so the "
                                  f"base value of {q} is gone; reload the pipeline and load it with keep_original=True")
        module, rel = hit
        return self.originals[module].get_parameter(rel)

    def resolve(self, q: str):
        hit = self._split(q)
        if hit is None:
            return None
        module, rel = hit
        new, selections = self.maps[module].get(rel, (None, ()))
        if new is None:
            return None, None
        return self.unet.get_parameter(f"{module}.{new}"), lambda v: select(v, selections)


def _attach(pipe, load: PruningLoad) -> PruningState:
    from .slim import load_pruning_into

    fs = features_of(pipe)
    spec, originals, maps = load_pruning_into(pipe.unet, load.directory, value_of=fs.base_value)
    originals = {name: m.to("cpu") for name, m in originals.items()} if load.keep_original else None
    return PruningState(pipe.unet, spec, originals, maps, load.directory)


def _detach(pipe, state: PruningState) -> None:
    from .slim import restore_modules

    if state.originals is None:
        raise RuntimeError("the pruning spec was loaded with keep_original=False; reload the pipeline instead")
    p = next(state.unet.parameters())
    restore_modules(state.unet, {n: m.to(p.device, p.dtype) for n, m in state.originals.items()})


PRUNING = register_feature(FeatureKind(
    "pruning", Touch.UNET_STRUCTURE | Touch.UNET_WEIGHTS, "structure", _attach, _detach,
    describe=lambda c: repr(c.directory),
))


class PruningMixin:
    """``pipe.load_pruning(dir)`` physically slims the U-Net to a pruning spec; ``unload_pruning()`` undoes it."""

    def load_pruning(self, directory, keep_original: bool = True):
        """Slim ``self.unet`` to the spec in ``directory`` (see :mod:`diffkit.pruning.spec`); return the spec.

        The spec must have been made for this base U-Net (architecture and the pruned modules' weights),
        else ``BaseModelMismatch``. Weights an attached erasure changed are sliced with the rest (they
        survive). With ``keep_original`` the replaced full modules are kept on the CPU so that
        :meth:`unload_pruning` can restore them; otherwise they are freed. All-or-nothing: on error
        the U-Net is as before. A thin call of ``pipe.features.attach("pruning", ...)``.
        """
        fs = features_of(self)
        if fs.first("pruning") is not None:
            raise RuntimeError("a pruning spec is already loaded; call pipe.unload_pruning() first")
        return fs.attach("pruning", PruningLoad(str(Path(directory)), keep_original)).state.spec

    def unload_pruning(self) -> None:
        """Put the original (unpruned) modules back (detach features attached after it first)."""
        fs = features_of(self)
        feature = fs.first("pruning")
        if feature is None:
            raise RuntimeError("no pruning spec is loaded")
        if feature.state.originals is None:
            raise RuntimeError("the pruning spec was loaded with keep_original=False; reload the pipeline instead")
        feature.detach()

    @property
    def pruning_spec(self):
        """The loaded :class:`~diffkit.pruning.spec.PruningSpec`, or None."""
        feature = features_of(self).first("pruning")
        return None if feature is None else feature.state.spec
