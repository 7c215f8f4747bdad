"""Erasure artifacts: ``erasure.safetensors`` (only the changed tensors) + ``erasure.json`` (sidecar).

Tensors are stored under their qualified names (``unet.<name>`` / ``text_encoder.<name>`` / on SDXL
``text_encoder_2.<name>``) in one of these encodings (``sidecar["encoding"]``):
  * ``dense``: the whole trained tensor (ESD and every method that changes whole tensors);
  * ``lora``: a LoRA-parametrised job's adapters (``parametrization: lora``), kept in diffusers' own LoRA
    file (``pytorch_lora_weights.safetensors``, see ``diffkit.erasure.lora_param``) instead of
    ``erasure.safetensors``; a changed tensor is ``W0 + (alpha / r) B A`` (``sidecar["lora"]``);
  * ``masked``: only the values at a mask's positions (``masked_values/<name>``, row-major order) and the
    mask itself as packed bits (``masked_bits/<name>``, ``numpy.packbits``). SalUn uses it: the unmasked
    entries never receive an update, so they are the base model's own values, which loading keeps. At
    the paper's 50% density this is 4.125 bytes per 2 weights instead of 8 (int32 indices would be 8).

The sidecar holds the method, concept, anchor, hyper-parameters, seed, metrics and the **base-model
fingerprint**: per touched component (``text_encoder_2`` included) a hash of its architecture config, and
per touched tensor the SHA-256 of the original values in float32, float16 and bfloat16 (so an artifact
trained in float32 still recognises its base model loaded in half precision). Files are written atomically (temporary
file, then ``os.replace``); the JSON is written last and marks the artifact complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import (
    CHECKSUM_DTYPES,
    ArtifactError,
    SidecarSchema,
    atomic_save_safetensors,
    atomic_write_json,
    config_hash,
    fingerprint,
    load_safetensors,
    read_json,
    tensor_checksum,
    tensor_checksums,
)
from .lora_param import LORA_FILE, LoraParametrization, lora_delta, lora_keys, save_lora_file

__all__ = ["CHECKSUM_DTYPES", "FORMAT", "SCHEMA", "Artifact", "ArtifactError", "base_fingerprint", "config_hash",
           "is_complete", "read_artifact", "read_sidecar", "tensor_checksum", "tensor_checksums", "tensors_file",
           "write_artifact", "write_lora_artifact"]

SCHEMA = SidecarSchema("diffkit.erasure", 1, reads=(1,), required=("method", "base_model", "tensor_names",
                                                                   "encoding", "shapes"))
FORMAT = SCHEMA.format
TENSORS_FILE = "erasure.safetensors"
SIDECAR_FILE = "erasure.json"


def base_fingerprint(components: dict[str, torch.nn.Module], originals: dict[str, torch.Tensor]) -> dict:
    """The fingerprint of the base model restricted to what an artifact touches (the kernel's)."""
    return fingerprint(components, originals)


VALUES, BITS = "masked_values/", "masked_bits/"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))


@dataclass
class Artifact:
    """An erasure artifact read from disk; ``materialize`` gives a tensor's trained value."""

    path: Path
    sidecar: dict
    tensors: dict[str, torch.Tensor]  # as stored (dense names, masked_values/..., masked_bits/...)

    @property
    def method(self) -> str:
        return self.sidecar["method"]

    @property
    def names(self) -> list[str]:
        """Qualified names of the tensors the artifact changes."""
        return list(self.sidecar["tensor_names"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sidecar["shapes"][name])

    def encoding(self, name: str) -> str:
        return self.sidecar["encoding"][name]

    def mask(self, name: str) -> torch.Tensor | None:
        """The bool mask of a ``masked`` tensor (None for dense ones)."""
        if self.encoding(name) != "masked":
            return None
        shape = self.shape(name)
        return unpack_mask(self.tensors[BITS + name], math.prod(shape)).reshape(shape)

    @property
    def lora(self) -> LoraParametrization | None:
        """The rank and alpha of a LoRA-parametrised artifact (None for full-rank ones)."""
        spec = self.sidecar.get("lora")
        return None if spec is None else LoraParametrization(int(spec["rank"]), float(spec["alpha"]))

    def materialize(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The trained value of ``name`` given the base model's tensor (used for masked entries' complement
        and as ``W0`` of a LoRA's ``W0 + (alpha / r) B A``)."""
        if self.encoding(name) == "dense":
            return self.tensors[name]
        if self.encoding(name) == "lora":
            a, b = (self.tensors[k] for k in lora_keys(name))
            base = base.detach().to("cpu")
            return (base.float() + lora_delta(a, b, self.lora.scaling)).to(base.dtype)
        out = base.detach().to("cpu").clone().reshape(-1)
        out[self.mask(name).reshape(-1)] = self.tensors[VALUES + name].to(out.dtype)
        return out.reshape(self.shape(name))


def write_artifact(out: str | Path, tensors: dict[str, torch.Tensor], sidecar: dict,
                   masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the changed tensors and the sidecar (last, atomically: its presence marks completion).

    Tensors named in ``masks`` are stored ``masked`` (values at the mask's positions + packed bits).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    masks = masks or {}
    names = sorted(tensors)
    if sorted(sidecar["base_model"]["tensors"]) != names:
        raise ValueError("artifact sidecar fingerprint must cover exactly the stored tensors")
    stored, encoding = {}, {}
    for q in names:
        t = tensors[q].detach().to("cpu")
        if q in masks:
            m = masks[q].detach().to("cpu", torch.bool)
            stored[VALUES + q] = t.reshape(-1)[m.reshape(-1)].contiguous()
            stored[BITS + q] = pack_mask(m)
            encoding[q] = "masked"
        else:
            stored[q] = t
            encoding[q] = "dense"
    atomic_save_safetensors(out / TENSORS_FILE, stored, metadata={"format": FORMAT})
    storage = (out / TENSORS_FILE).stat().st_size
    shapes = {q: list(tensors[q].shape) for q in names}
    atomic_write_json(out / SIDECAR_FILE, {"format": FORMAT, **sidecar, "tensor_names": names, "encoding": encoding,
                                          "shapes": shapes, "storage_bytes": storage}, indent=2)
    return out


def write_lora_artifact(out: str | Path, state: dict[str, dict[str, torch.Tensor]], spec: LoraParametrization,
                        modules: list[str], sidecar: dict) -> Path:
    """Write a LoRA-parametrised artifact: diffusers' LoRA file, then the sidecar (last, atomically).

    ``state``: per component, peft's keys (``<module>.lora_A.weight``); ``modules``: the qualified names of
    the adapted modules. The sidecar's tensors are the adapted modules' weights (``unet.<module>.weight``),
    which its fingerprint must cover exactly, as for the other encodings.
    """
    out = Path(out)
    names = sorted(f"{m}.weight" for m in modules)
    if sorted(sidecar["base_model"]["tensors"]) != names:
        raise ValueError("artifact sidecar fingerprint must cover exactly the adapted weights")
    path = save_lora_file(out, state, spec, modules)
    shapes = {}
    for q in names:
        comp, _, _ = q.partition(".")
        a_key, b_key = (k.partition(".")[2] for k in lora_keys(q))
        delta = lora_delta(state[comp][a_key], state[comp][b_key], spec.scaling)
        shapes[q] = list(delta.shape)
    atomic_write_json(out / SIDECAR_FILE, {
        "format": FORMAT, **sidecar, "tensor_names": names, "encoding": dict.fromkeys(names, "lora"),
        "shapes": shapes, "lora": {"rank": int(spec.rank), "alpha": float(spec.alpha), "scaling": spec.scaling,
                                   "targets": sorted(modules), "file": LORA_FILE},
        "storage_bytes": path.stat().st_size}, indent=2)
    return out


def tensors_file(sidecar: dict) -> str:
    """The file holding an artifact's tensors: diffusers' LoRA file for LoRA-parametrised ones."""
    return LORA_FILE if sidecar.get("lora") else TENSORS_FILE


def is_complete(out: str | Path) -> bool:
    out = Path(out)
    return (out / SIDECAR_FILE).is_file() and ((out / TENSORS_FILE).is_file() or (out / LORA_FILE).is_file())


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"erasure artifact {str(path)!r} is not a directory")
    side = path / SIDECAR_FILE
    if not side.is_file():
        raise ArtifactError(f"{str(path)!r} is not an erasure artifact: {SIDECAR_FILE} is missing")
    data = read_json(side)
    SCHEMA.version_of(data, side)
    return data


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    sidecar = read_sidecar(path)
    name = tensors_file(sidecar)
    tfile = path / name
    if not tfile.is_file():
        raise ArtifactError(f"erasure artifact {str(path)!r} lacks {name}")
    SCHEMA.validate(sidecar, path / SIDECAR_FILE)
    tensors = load_safetensors(tfile)
    encoding = sidecar.get("encoding", {})
    expected = set()
    for q in sidecar.get("tensor_names", []):
        kind = encoding.get(q)
        expected |= {VALUES + q, BITS + q} if kind == "masked" else set(lora_keys(q)) if kind == "lora" else {q}
    if set(tensors) != expected or set(encoding) != set(sidecar.get("tensor_names", [])):
        raise ArtifactError(f"erasure artifact {str(path)!r}: {name} and {SIDECAR_FILE} disagree on tensors")
    artifact = Artifact(path, sidecar, tensors)
    for q in artifact.names:  # a stored tensor must hold what the sidecar says (a corrupt file is refused whole)
        shape = artifact.shape(q)
        if artifact.encoding(q) == "dense":
            ok = tuple(tensors[q].shape) == shape
        elif artifact.encoding(q) == "lora":
            a, b = (tensors[k] for k in lora_keys(q))
            ok = (a.dim() >= 2 and b.dim() == a.dim() and b.shape[1] == a.shape[0] == artifact.lora.rank
                  and tuple(b.shape[:1]) + tuple(a.shape[1:]) == shape)
        else:
            ok = tensors[BITS + q].numel() == (math.prod(shape) + 7) // 8 and \
                tensors[VALUES + q].numel() == int(artifact.mask(q).sum())
        if not ok:
            raise ArtifactError(f"erasure artifact {str(path)!r}: tensor {q} does not have the shape {list(shape)} "
                                f"its {SIDECAR_FILE} records")
    return artifact
