"""The pruning spec directory: kept indices (JSON) + the slim modules' weights (safetensors).

Layout::

    spec.json            {"format": "diffkit.pruning/2", "base": fingerprint, "units": {name: {kind,
                          size, width}}, "kept": {name: [indices]}, "stats": {...}, "config": {...}}
    pruned.safetensors   the state of every changed module, keys "<module name>.<param name>"

Both go through the artifact kernel (:mod:`diffkit.artifacts`): atomic writes, and the one base-model
fingerprint, here over every parameter of the modules the spec slims (qualified ``unet.<name>``), so
a spec refuses a U-Net whose pruned modules hold other weights. Specs of format ``diffkit.pruning/1``
(whose fingerprint summed three weights: ``conv_in``, the first time-embedding layer and ``conv_out``)
still load and are checked the old way. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import (
    ArtifactError,
    BaseModelMismatch,
    SidecarSchema,
    atomic_save_safetensors,
    atomic_write_json,
    check_fingerprint,
    load_safetensors,
    read_sidecar,
)
from ..artifacts import fingerprint as kernel_fingerprint

SCHEMA = SidecarSchema("diffkit.pruning", 2, reads=(1, 2), required=("kept", "units", "base"))
FORMAT = SCHEMA.format
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "pruned.safetensors"
#: The weights whose checksums identified the base model in format 1 specs.
LEGACY_CHECKSUM_WEIGHTS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")

__all__ = ["FORMAT", "SCHEMA", "ArtifactError", "BaseModelMismatch", "PruningSpec", "atomic_save_safetensors",
           "atomic_write_json", "check_base", "module_fingerprint", "read_spec", "save_spec"]


def architecture_hash(unet) -> str:
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def module_fingerprint(unet, module_names, value_of: Callable[[str], torch.Tensor] | None = None) -> dict:
    """The kernel fingerprint of every parameter of ``module_names`` (``value_of``: base values by
    qualified name; default the U-Net's own)."""
    value_of = value_of or (lambda q: unet.get_parameter(q.split(".", 1)[1]))
    names = sorted({f"unet.{m}.{p}" for m in module_names for p, _ in unet.get_submodule(m).named_parameters()})
    return kernel_fingerprint({"unet": unet}, {q: value_of(q) for q in names})


def _check_legacy(expected: dict, unet, rtol: float = 2e-3) -> None:
    state = dict(unet.named_parameters())
    if architecture_hash(unet) != expected["architecture"]:
        raise BaseModelMismatch("this pruning spec was made for a different U-Net architecture (config hash "
                                f"{expected['architecture'][:12]}, this U-Net has {architecture_hash(unet)[:12]})")
    for name, (s, s2) in expected.get("checksums", {}).items():
        if name not in state or state[name].device.type == "meta":
            continue
        w = state[name].detach().double()
        gs, gs2 = float(w.sum()), float((w * w).sum())
        if abs(gs2 - s2) > rtol * abs(s2) + 1e-6 or abs(gs - s) > rtol * (abs(s) + s2**0.5) + 1e-6:
            raise BaseModelMismatch(f"this pruning spec was made for a U-Net with other weights (checksum of "
                                    f"{name} differs)")


def check_base(expected: dict, unet, value_of: Callable[[str], torch.Tensor] | None = None) -> None:
    """Raise :class:`BaseModelMismatch` unless ``unet`` (its base values) is the spec's base model."""
    if "architecture" in expected:  # format 1
        _check_legacy(expected, unet)
        return
    value_of = value_of or (lambda q: unet.get_parameter(q.split(".", 1)[1]))
    check_fingerprint(expected, {"unet": unet}, value_of, "this pruning spec")


@dataclass(frozen=True)
class PruningSpec:
    """What to keep: kept unit indices per module name, plus the base fingerprint and provenance."""

    kept: dict[str, list[int]]
    units: dict[str, dict]  # name -> {"kind", "size", "width"}
    base: dict
    stats: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "kept": self.kept, "units": self.units, "base": self.base,
                "stats": self.stats, "config": self.config}

    @classmethod
    def from_json(cls, obj: dict, source="pruning spec") -> PruningSpec:
        SCHEMA.validate(obj, source)
        return cls(kept={k: list(v) for k, v in obj["kept"].items()}, units=obj["units"], base=obj["base"],
                   stats=obj.get("stats", {}), config=obj.get("config", {}))


def save_spec(directory, spec: PruningSpec, modules: dict[str, torch.nn.Module]) -> Path:
    """Write ``pruned.safetensors`` (state of the changed ``modules``), then ``spec.json``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    atomic_save_safetensors(directory / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
    atomic_write_json(directory / SPEC_FILE, spec.to_json())
    return directory


def read_spec(directory) -> tuple[PruningSpec, dict[str, torch.Tensor]]:
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"no pruning spec at {directory} (missing {SPEC_FILE})")
    spec = PruningSpec.from_json(read_sidecar(spec_path, SCHEMA), spec_path)
    weights_path = directory / WEIGHTS_FILE
    tensors = load_safetensors(weights_path) if weights_path.is_file() else {}
    return spec, tensors
