"""Atomic, resumable training checkpoints of the zoo's models: safetensors tensors + a JSON pointer.

A checkpoint holds module state dicts and AdamW moments under prefixed names, so a killed training
job resumes bit-for-bit (its data and noise are drawn from generators seeded by the step number). It
goes through the artifact kernel's :class:`~diffkit.artifacts.CheckpointStore` (step-named tensor
file, then the pointer ``checkpoint.json``), so a kill between the writes resumes the previous step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import CheckpointStore, atomic_write_json

__all__ = ["atomic_write_json", "load_checkpoint", "save_checkpoint"]


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
    """Write ``checkpoint-<step>.safetensors``, then the pointer ``checkpoint.json`` naming it."""
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}/{k}"] = v
    for k, v in _optimizer_tensors(optimizer).items():
        tensors[f"optimizer/{k}"] = v
    CheckpointStore(directory).save(step, tensors, meta)


def load_checkpoint(directory: Path, modules: dict, optimizer) -> dict | None:
    """Restore modules and optimizer from ``directory``; return the JSON sidecar, or None if absent."""
    found = CheckpointStore(directory).load()
    if found is None:
        return None
    meta, tensors = found
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    _load_optimizer(optimizer, {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")})
    return meta
