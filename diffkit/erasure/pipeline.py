"""Erasure as a lifecycle feature, and the pipeline verbs ``load_erasure`` / ``unload_erasure``.

The feature kind ``"erasure"`` (stage "weights"; several at once on disjoint tensors) copies an
artifact's tensors into the pipeline's own parameters (U-Net and/or text encoders) after keeping a clone
of what they replace; detaching copies those clones back, so the pipeline is bit-identical to before.

Loading is all-or-nothing: the artifact is read and checked whole (shapes, base model, overlaps)
before any tensor changes, and if a copy still fails every tensor already patched is put back.

With pruning attached first, each tensor goes where the lifecycle says it lives now
(``FeatureSet.resolve``): sliced to the kept units, or dropped with its removed module; the base-model
check reads the base values (``FeatureSet.base_value``), so the pruned pipeline still recognises the
model the artifact was trained on. Overlapping artifacts are refused (stacking them would silently drop
one of the two erasures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import check_fingerprint
from ..lifecycle import FeatureKind, Touch, features_of, register_feature
from .artifact import read_artifact
from .selection import components_of


@dataclass
class LoadedErasure:
    """One applied erasure: where it came from, its sidecar, and the live values it replaced."""

    path: str
    sidecar: dict
    originals: dict[str, torch.Tensor]  # qualified name -> value before loading (live shape)
    full_size: bool = True  # originals are the full-size base values (no structure feature in between)

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.originals)

    @property
    def touches(self) -> Touch:
        t = Touch.NOTHING
        if any(q.startswith("unet.") for q in self.sidecar.get("tensor_names", self.originals)):
            t |= Touch.UNET_WEIGHTS
        if any(q.startswith("text_encoder") for q in self.sidecar.get("tensor_names", self.originals)):
            t |= Touch.TEXT_ENCODER_WEIGHTS
        return t

    def original(self, q: str):
        return self.originals.get(q) if self.full_size else None


def check_base_model(pipe_or_components, sidecar: dict, source: str, value_of=None) -> None:
    """Raise ``BaseModelMismatch`` (a ValueError) unless the pipeline holds the artifact's base model."""
    components = pipe_or_components if isinstance(pipe_or_components, dict) else components_of(pipe_or_components)
    if value_of is None:
        def value_of(q):
            comp, _, name = q.partition(".")
            return components[comp].get_parameter(name)
    check_fingerprint(sidecar.get("base_model") or {}, components, value_of, f"erasure artifact {source}")


def _attach(pipe, path: str) -> LoadedErasure:
    artifact = read_artifact(path)
    source = repr(str(path))
    fs = features_of(pipe)
    names = set(artifact.names)
    for loaded in fs.of("erasure"):
        overlap = sorted(names & set(loaded.state.sidecar.get("tensor_names", loaded.state.originals)))
        if overlap:
            raise ValueError(f"erasure artifact {source} overlaps the loaded erasure {loaded.state.path!r} on "
                             f"{len(overlap)} tensor(s) (e.g. {overlap[0]}); unload it first")
    check_base_model(components_of(pipe), artifact.sidecar, source, value_of=fs.base_value)
    # Resolve and materialise everything before changing anything.
    plan = []
    for q in sorted(names):
        param, select = fs.resolve(q)
        if param is None:
            continue  # its module was pruned away: nothing of it is left to erase
        base = fs.base_value(q)
        if artifact.shape(q) != tuple(base.shape):
            raise ValueError(f"erasure artifact {source}: tensor {q} has shape {artifact.shape(q)}, the "
                             f"pipeline's has {tuple(base.shape)}")
        value = select(artifact.materialize(q, base))
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"erasure artifact {source}: tensor {q} maps to shape {tuple(value.shape)}, the live "
                             f"parameter has {tuple(param.shape)}")
        plan.append((q, param, value))
    originals: dict[str, torch.Tensor] = {}
    done = []
    try:
        with torch.no_grad():
            for q, param, value in plan:
                originals[q] = param.detach().clone()
                param.copy_(value.to(device=param.device, dtype=param.dtype))
                done.append((q, param))
    except BaseException:
        with torch.no_grad():
            for q, param in done:
                param.copy_(originals[q])
        raise
    full = all(tuple(originals[q].shape) == artifact.shape(q) for q in originals)
    return LoadedErasure(str(Path(path)), artifact.sidecar, originals, full_size=full)


def _detach(pipe, state: LoadedErasure) -> None:
    fs = features_of(pipe)
    with torch.no_grad():
        for q, value in state.originals.items():
            param, _ = fs.resolve(q)
            param.copy_(value)


ERASURE = register_feature(FeatureKind(
    "erasure", Touch.UNET_WEIGHTS | Touch.TEXT_ENCODER_WEIGHTS, "weights", _attach, _detach, multiple=True,
    describe=repr,
))


class ErasureMixin:
    """``pipe.load_erasure(dir)``, ``pipe.unload_erasure()``, ``pipe.loaded_erasures``."""

    @property
    def loaded_erasures(self) -> list[LoadedErasure]:
        """The erasures applied to this pipeline, oldest first."""
        return [f.state for f in features_of(self).of("erasure")]

    def load_erasure(self, path) -> dict:
        """Apply the erasure artifact in directory ``path``; return its sidecar.

        Raises ``BaseModelMismatch`` (a ValueError) if the artifact was made for another base model,
        ``ArtifactError`` if it cannot be read, ValueError if it changes a tensor that an already loaded
        erasure changed. All-or-nothing: on any error the pipeline is exactly as before. A thin call of
        ``pipe.features.attach("erasure", path)``.
        """
        return features_of(self).attach("erasure", str(Path(path))).state.sidecar

    def register_erasure(self, path: str, sidecar: dict, originals: dict[str, torch.Tensor]) -> None:
        """Record an erasure already applied in place (the training engine uses this), for unloading."""
        features_of(self).record("erasure", str(path), LoadedErasure(str(path), sidecar, originals))

    def unload_erasure(self) -> int:
        """Restore every tensor the loaded erasures changed, bit-identically; return how many were unloaded."""
        return features_of(self).detach_all("erasure")
