"""Atomic, resumable training checkpoints: safetensors tensors + a JSON sidecar, never pickle.

A checkpoint holds module state dicts and AdamW moments under prefixed names, so a killed training
job resumes bit-for-bit (its data and noise are drawn from generators seeded by the step number).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write_json(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(directory: Path, step: int, modules: dict, optimizer, meta: dict) -> None:
    """Write ``checkpoint.safetensors`` + ``checkpoint.json`` in ``directory`` (each atomically;
    the JSON, written last, names the step the tensors belong to)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}/{k}"] = v
    for k, v in _optimizer_tensors(optimizer).items():
        tensors[f"optimizer/{k}"] = v
    atomic_save_file(tensors, directory / "checkpoint.safetensors")
    atomic_write_json(directory / "checkpoint.json", {**meta, "step": step})


def load_checkpoint(directory: Path, modules: dict, optimizer) -> dict | None:
    """Restore modules and optimizer from ``directory``; return the JSON sidecar, or None if absent."""
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(directory / "checkpoint.safetensors")
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    _load_optimizer(optimizer, {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")})
    return meta
