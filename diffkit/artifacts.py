"""The artifact kernel: atomic files, one base-model fingerprint, versioned sidecars, pointer checkpoints.

Every file diffkit ships or resumes from goes through here: erasure artifacts, pruning specs, the
erasure / mask-learning / reference-model training checkpoints.

* **Atomic writes.** A file is written under a temporary name in its folder, flushed, given mode
  0644 minus the umask (artifacts are meant to be shared; ``mkstemp`` and safetensors make 0600), then
  renamed over the target (``os.replace``): a reader sees the old file or the new one, never half.
* **One fingerprint** of the base model, restricted to what an artifact touches: per component a hash
  of its architecture config, per tensor the SHA-256 of its values cast to float32, float16 and
  bfloat16 (an artifact trained in float32 recognises its base loaded in half precision), and a short
  digest of all of it. :func:`check_fingerprint` compares it with a model and raises
  :class:`BaseModelMismatch`, the one error type for "made for another base model".
* **Versioned sidecars.** A :class:`SidecarSchema` names a format, the versions it reads and the keys
  it requires; :func:`read_sidecar` refuses anything else with an :class:`ArtifactError` naming the file.
* **Pointer checkpoints.** :class:`CheckpointStore` writes a checkpoint's files under step-named
  names, then switches one JSON pointer to them, then removes older files: a kill between any two
  writes leaves the previous complete checkpoint readable (the pointer is the only switch).

Never pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKSUM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Config keys that are book-keeping, not architecture (versions, dtype, names).
_CONFIG_SKIP = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path"}


class ArtifactError(ValueError):
    """A file diffkit wrote cannot be read back: missing, truncated, of another format or version."""


class BaseModelMismatch(ArtifactError):
    """An artifact was made for another base model (architecture or weights)."""


# ---------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------


def _shared_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace(tmp: str | Path, path: str | Path) -> None:
    """The one switch of every write (tests interrupt writers here)."""
    os.replace(tmp, path)


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _shared_mode())
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic(Path(path), write)


def atomic_write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """JSON with sorted keys; NaN / infinity are refused (they are not JSON)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                            metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(data, tmp, metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is an :class:`ArtifactError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarSchema:
    """A sidecar format: ``"<name>/<version>"`` in its ``format`` key, and the keys it must hold."""

    name: str
    version: int
    reads: tuple[int, ...]
    required: tuple[str, ...] = ()

    @property
    def format(self) -> str:
        return f"{self.name}/{self.version}"

    def version_of(self, data: dict, source) -> int:
        fmt = data.get("format")
        prefix = self.name + "/"
        if not isinstance(fmt, str) or not fmt.startswith(prefix) or not fmt[len(prefix):].isdigit():
            raise ArtifactError(f"{source} is not a {self.name} file (format {fmt!r}, expected {self.format!r})")
        version = int(fmt[len(prefix):])
        if version not in self.reads:
            raise ArtifactError(f"{source} is {fmt!r}; this diffkit reads versions {list(self.reads)} of "
                                f"{self.name!r} (upgrade diffkit for newer ones)")
        return version

    def validate(self, data: dict, source) -> int:
        version = self.version_of(data, source)
        missing = [k for k in self.required if k not in data]
        if missing:
            raise ArtifactError(f"{source} lacks {', '.join(missing)}")
        return version


def write_sidecar(path: str | Path, schema: SidecarSchema, obj: dict) -> Path:
    data = {**obj, "format": schema.format}
    schema.validate(data, path)
    return atomic_write_json(path, data)


def read_sidecar(path: str | Path, schema: SidecarSchema) -> dict:
    data = read_json(path)
    schema.validate(data, path)
    return data


# ---------------------------------------------------------------------------------------------------
# The base-model fingerprint
# ---------------------------------------------------------------------------------------------------


def tensor_checksum(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype-specific)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def tensor_checksums(t: torch.Tensor) -> dict[str, str]:
    """The checksum of the tensor cast to each of float32 / float16 / bfloat16."""
    base = t.detach().to("cpu")
    return {name: tensor_checksum(base.to(dtype)) for name, dtype in CHECKSUM_DTYPES.items()}


def config_hash(module: torch.nn.Module) -> str:
    """Hash of a component's architecture config (book-keeping keys like versions and dtype dropped)."""
    cfg = module.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _CONFIG_SKIP}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(components: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> dict:
    """The base model restricted to ``tensors`` (qualified names ``<component>.<parameter>``)."""
    touched = sorted({q.split(".", 1)[0] for q in tensors})
    comps = {c: config_hash(components[c]) for c in touched}
    sums = {q: tensor_checksums(tensors[q]) for q in sorted(tensors)}
    digest = hashlib.sha256(json.dumps([comps, sums], sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "components": comps, "tensors": sums}


def check_fingerprint(expected: dict, components: Mapping[str, torch.nn.Module],
                      value_of: Callable[[str], torch.Tensor], what: str) -> None:
    """Raise :class:`BaseModelMismatch` unless the model's base values match ``expected``.

    ``value_of(q)`` gives the *base* value of tensor ``q`` (a pipeline passes the value before any
    attached feature changed it, so an erased or pruned pipeline still recognises its base model).
    """
    fp = expected.get("fingerprint", "?")
    for comp, h in (expected.get("components") or {}).items():
        if comp not in components:
            raise BaseModelMismatch(f"{what} changes a {comp}, which this pipeline lacks")
        if config_hash(components[comp]) != h:
            raise BaseModelMismatch(f"{what} was made for a different base model (fingerprint {fp}): this "
                                    f"pipeline's {comp} has a different architecture")
    for q, sums in (expected.get("tensors") or {}).items():
        try:
            value = value_of(q)
        except (AttributeError, KeyError):
            raise BaseModelMismatch(f"{what} was made for a different base model (fingerprint {fp}): this "
                                    f"pipeline has no tensor {q}") from None
        key = str(value.dtype).replace("torch.", "")
        if key not in CHECKSUM_DTYPES:
            value, key = value.float(), "float32"
        if tensor_checksum(value) != sums.get(key):
            raise BaseModelMismatch(f"{what} was made for a different base model (fingerprint {fp}): "
                                    f"tensor {q} differs from the one it was trained from")


def model_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: identifies exact weights (benchmarks' resume check)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(tensor_checksum(p).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Checkpoints: step-named files + one pointer
# ---------------------------------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints in ``folder``: ``<stem>-<step>.safetensors`` (+ optional JSON parts) and one pointer.

    :meth:`save` writes every part under a step-named file, then the pointer ``<stem>.json`` (which
    names them and holds ``info``), then deletes files of older steps. :meth:`load` follows the
    pointer. Only the pointer switch makes a checkpoint current, so a kill between any two writes
    resumes from the previous complete checkpoint.
    """

    def __init__(self, folder: str | Path, stem: str = "checkpoint"):
        self.folder = Path(folder)
        self.stem = stem

    @property
    def pointer(self) -> Path:
        return self.folder / f"{self.stem}.json"

    def exists(self) -> bool:
        return self.pointer.is_file()

    def save(self, step: int, tensors: Mapping[str, torch.Tensor], info: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.stem}-{int(step):08d}.safetensors"
        atomic_save_safetensors(self.folder / name, tensors)
        atomic_write_json(self.pointer, {**info, "step": int(step), "file": name})
        for old in self.folder.glob(f"{self.stem}-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return self.folder / name

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(info, tensors)`` of the current checkpoint, or ``None`` when there is none."""
        if not self.exists():
            return None
        info = read_json(self.pointer)
        # Checkpoints written before the pointer scheme kept one fixed-name tensor file beside the JSON.
        name = info.get("file", f"{self.stem}.safetensors")
        return info, load_safetensors(self.folder / name)
