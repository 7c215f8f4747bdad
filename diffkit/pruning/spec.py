"""The pruning spec directory: kept indices (JSON) + the slim modules' weights (safetensors).

Layout::

    spec.json            {"format": "diffkit.pruning/1", "base": fingerprint, "units": {name: {kind,
                          size, width}}, "kept": {name: [indices]}, "stats": {...}, "config": {...}}
    pruned.safetensors   the state of every changed module, keys "<module name>.<param name>"

Both are written atomically (temp file, then ``os.replace``). The base fingerprint is a hash of the
U-Net config (architecture) plus float64 checksums of a few weights; loading onto another architecture
or other weights is a clear error. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "diffkit.pruning/1"
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "pruned.safetensors"
#: Weights whose checksums identify the base model (present in every UNet2DConditionModel).
CHECKSUM_WEIGHTS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")


class BaseModelMismatch(ValueError):
    """The spec was made for another base U-Net."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def architecture_hash(unet) -> str:
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(unet) -> dict:
    """Architecture hash + per-weight (sum, sum of squares) in float64, dtype-independent to ~1e-3."""
    state = dict(unet.named_parameters())
    sums = {}
    for name in CHECKSUM_WEIGHTS:
        if name in state and state[name].device.type != "meta":
            w = state[name].detach().double()
            sums[name] = [float(w.sum()), float((w * w).sum())]
    return {"architecture": architecture_hash(unet), "checksums": sums}


def check_fingerprint(expected: dict, unet, rtol: float = 2e-3) -> None:
    got = fingerprint(unet)
    if got["architecture"] != expected["architecture"]:
        raise BaseModelMismatch(
            "this pruning spec was made for a different U-Net architecture (config hash "
            f"{expected['architecture'][:12]}, this U-Net has {got['architecture'][:12]})"
        )
    for name, (s, s2) in expected.get("checksums", {}).items():
        if name not in got["checksums"]:
            continue
        gs, gs2 = got["checksums"][name]
        if abs(gs2 - s2) > rtol * abs(s2) + 1e-6 or abs(gs - s) > rtol * (abs(s) + s2**0.5) + 1e-6:
            raise BaseModelMismatch(
                f"this pruning spec was made for a U-Net with other weights (checksum of {name} differs)"
            )


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
    def from_json(cls, obj: dict) -> PruningSpec:
        if obj.get("format") != FORMAT:
            raise ValueError(f"not a diffkit pruning spec (format {obj.get('format')!r}, expected {FORMAT!r})")
        return cls(kept={k: list(v) for k, v in obj["kept"].items()}, units=obj["units"], base=obj["base"],
                   stats=obj.get("stats", {}), config=obj.get("config", {}))


def save_spec(directory, spec: PruningSpec, modules: dict[str, torch.nn.Module]) -> Path:
    """Write ``spec.json`` and ``pruned.safetensors`` (state of the changed ``modules``) atomically."""
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
    spec = PruningSpec.from_json(json.loads(spec_path.read_text(encoding="utf-8")))
    weights_path = directory / WEIGHTS_FILE
    tensors = load_file(str(weights_path)) if weights_path.is_file() else {}
    return spec, tensors
