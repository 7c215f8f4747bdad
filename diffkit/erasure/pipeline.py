"""Pipeline methods: ``load_erasure`` / ``unload_erasure`` (mixed into every diffkit pipeline).

Loading copies the artifact's tensors into the pipeline's own parameters (U-Net and/or text encoder)
after keeping a clone of what they replace; unloading copies those clones back, so the pipeline is
bit-identical to before. Artifacts that touch disjoint tensors stack; overlapping ones are refused
(stacking them would silently drop one of the two erasures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import CHECKSUM_DTYPES, config_hash, read_artifact, tensor_checksum
from .selection import components_of, get_parameter


@dataclass
class LoadedErasure:
    """One applied erasure: where it came from, its sidecar, and the values it replaced."""

    path: str
    sidecar: dict
    originals: dict[str, torch.Tensor]

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.originals)


def check_base_model(components: dict, sidecar: dict, source: str) -> None:
    """Raise ValueError unless ``components`` hold the base model the artifact was made for."""
    base = sidecar.get("base_model") or {}
    fp = base.get("fingerprint", "?")
    for comp, expected in (base.get("components") or {}).items():
        if comp not in components:
            raise ValueError(f"erasure artifact {source} changes a {comp}, which this pipeline lacks")
        if config_hash(components[comp]) != expected:
            raise ValueError(f"erasure artifact {source} was made for a different base model "
                             f"(fingerprint {fp}): this pipeline's {comp} has a different architecture")
    for q, sums in (base.get("tensors") or {}).items():
        p = get_parameter(components, q)
        key = str(p.dtype).replace("torch.", "")
        actual = tensor_checksum(p) if key in CHECKSUM_DTYPES else tensor_checksum(p.float())
        if actual != sums.get(key if key in CHECKSUM_DTYPES else "float32"):
            raise ValueError(f"erasure artifact {source} was made for a different base model "
                             f"(fingerprint {fp}): tensor {q} differs from the one it was trained from")


class ErasureMixin:
    """``pipe.load_erasure(dir)``, ``pipe.unload_erasure()``, ``pipe.loaded_erasures``."""

    def _erasure_stack(self) -> list[LoadedErasure]:
        return self.__dict__.setdefault("_diffkit_erasures", [])

    @property
    def loaded_erasures(self) -> list[LoadedErasure]:
        """The erasures applied to this pipeline, oldest first."""
        return list(self._erasure_stack())

    def load_erasure(self, path) -> dict:
        """Apply the erasure artifact in directory ``path``; return its sidecar.

        Raises ValueError if the artifact was made for another base model, or if it changes a tensor
        that an already loaded erasure changed.
        """
        artifact = read_artifact(path)
        source = repr(str(path))
        components = components_of(self)
        names = set(artifact.names)
        for loaded in self._erasure_stack():
            overlap = sorted(names & set(loaded.originals))
            if overlap:
                raise ValueError(f"erasure artifact {source} overlaps the loaded erasure {loaded.path!r} on "
                                 f"{len(overlap)} tensor(s) (e.g. {overlap[0]}); unload it first")
        check_base_model(components, artifact.sidecar, source)
        params = {q: get_parameter(components, q) for q in sorted(names)}
        for q, p in params.items():
            if artifact.shape(q) != tuple(p.shape):
                raise ValueError(f"erasure artifact {source}: tensor {q} has shape "
                                 f"{artifact.shape(q)}, the pipeline's has {tuple(p.shape)}")
        originals = {}
        with torch.no_grad():
            for q, p in params.items():
                originals[q] = p.detach().clone()
                p.copy_(artifact.materialize(q, p).to(device=p.device, dtype=p.dtype))
        self.register_erasure(str(Path(path)), artifact.sidecar, originals)
        return artifact.sidecar

    def register_erasure(self, path: str, sidecar: dict, originals: dict[str, torch.Tensor]) -> None:
        """Record an erasure already applied in place (the training engine uses this), for unloading."""
        self._erasure_stack().append(LoadedErasure(path, sidecar, originals))

    def unload_erasure(self) -> int:
        """Restore every tensor the loaded erasures changed, bit-identically; return how many were unloaded."""
        stack = self._erasure_stack()
        components = components_of(self)
        count = len(stack)
        with torch.no_grad():
            while stack:
                loaded = stack.pop()
                for q, value in loaded.originals.items():
                    get_parameter(components, q).copy_(value)
        return count
