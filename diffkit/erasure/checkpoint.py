"""Training checkpoints: trained tensors, Adam state and RNG state (safetensors) + a JSON pointer.

Through the artifact kernel's :class:`~diffkit.artifacts.CheckpointStore`:
``checkpoint-<step>.safetensors`` is written first (atomically), then ``checkpoint.json`` names it
(atomically), then older checkpoint files are removed; a kill at any point leaves the previous complete
checkpoint readable. With the RNG state restored, a resumed job continues with exactly the draws an
uninterrupted one would make, so both end with the same artifact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import CheckpointStore

POINTER = "checkpoint.json"


def save_checkpoint(folder: str | Path, step: int, params: dict[str, torch.nn.Parameter], optimizer,
                    rng: torch.Generator, info: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the state after ``step`` completed steps. ``optimizer`` is a torch Adam over ``params``."""
    tensors = {f"param/{q}": p.detach() for q, p in params.items()}
    state = optimizer.state_dict()["state"]
    for i, q in enumerate(params):
        for key, value in state.get(i, {}).items():
            tensors[f"adam/{q}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/loop"] = rng.get_state()
    tensors.update({f"method/{k}": v.detach() for k, v in (extra or {}).items()})  # a method's own state
    return CheckpointStore(folder).save(step, tensors, {**info, "tensors": list(params)})


def method_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors a method saved with :func:`save_checkpoint`."""
    return {k[len("method/"):]: v for k, v in tensors.items() if k.startswith("method/")}


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(info, tensors) of the latest complete checkpoint, or None when there is none."""
    return CheckpointStore(folder).load()


def restore_checkpoint(tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], optimizer,
                       rng: torch.Generator) -> None:
    """Load trained values, Adam state and the RNG state saved by :func:`save_checkpoint`."""
    with torch.no_grad():
        for q, p in params.items():
            p.copy_(tensors[f"param/{q}"].to(device=p.device, dtype=p.dtype))
    sd = optimizer.state_dict()
    state = {}
    for i, (q, p) in enumerate(params.items()):
        prefix = f"adam/{q}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = {k: (v if k == "step" else v.to(device=p.device)) for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    rng.set_state(tensors["rng/loop"])
