"""Export a full-rank erasure artifact as plain diffusers components: ``unet/`` and/or ``text_encoder/``
(and ``text_encoder_2/`` for an SDXL artifact that patches it).

``export_erasure(pipe, artifact, out)`` loads the artifact onto the base pipeline with diffkit's own
loader (the base-model fingerprint is checked first, as ``load_erasure`` does), writes every component it
touches with that component's ``save_pretrained`` (safetensors + ``config.json``) and unloads it again,
so the pipeline is left bit-identical. The folders load without diffkit::

    unet = UNet2DConditionModel.from_pretrained("exported/unet")
    text_encoder = CLIPTextModel.from_pretrained("exported/text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(base, unet=unet, text_encoder=text_encoder)

and compute exactly what ``pipe.load_erasure(artifact)`` computes (the same tensors, in the base model's
dtype). ``diffkit_export.json`` beside them records the artifact's method, concept and base fingerprint.

The output is atomic: everything is written to a temporary folder next to ``out`` and renamed to ``out``
last; ``out`` must not exist or be an empty folder. Pruning specs are refused: their slimmed widths do not
fit a diffusers config, so they stay diffkit-only (``pipe.load_pruning``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..artifacts import ArtifactError, atomic_write_json, read_json
from ..lifecycle import features_of
from .artifact import read_sidecar
from .lora_param import LORA_FILE  # a LoRA-parametrised artifact is loadable by diffusers as it is

#: Written beside the exported components: where they came from.
EXPORT_FILE = "diffkit_export.json"
#: A pruning spec's sidecar (diffkit.pruning.spec.SPEC_FILE; erasure does not import pruning).
_PRUNING_SPEC_FILE = "spec.json"
PRUNING_REFUSAL = ("is a pruning spec: pruning specs stay diffkit-only, because their slimmed widths do not fit a "
                   "diffusers config (load it with pipe.load_pruning); export takes erasure artifacts")


def is_pruning_spec(path: str | Path) -> bool:
    """Whether ``path`` is a pruning spec folder (its ``spec.json`` has a ``diffkit.pruning/...`` format)."""
    spec = Path(path) / _PRUNING_SPEC_FILE
    if not spec.is_file():
        return False
    try:
        fmt = read_json(spec).get("format", "")
    except ArtifactError:
        return False
    return isinstance(fmt, str) and fmt.startswith("diffkit.pruning")


def check_exportable(artifact: str | Path, out: str | Path) -> dict:
    """Refuse what cannot be exported before any model loads; return the artifact's sidecar."""
    if is_pruning_spec(artifact):
        raise ValueError(f"{str(artifact)!r} {PRUNING_REFUSAL}")
    if (Path(artifact) / LORA_FILE).is_file():
        raise ValueError(f"{str(artifact)!r} is a LoRA-parametrised artifact: its {LORA_FILE} already loads in plain "
                         f"diffusers (pipe.load_lora_weights(folder)); export writes full-rank artifacts")
    sidecar = read_sidecar(artifact)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty folder; export writes a new folder")
    return sidecar


def export_erasure(pipe, artifact: str | Path, out: str | Path) -> Path:
    """Write the components ``artifact`` patches, in diffusers format, to ``out``; return ``out``.

    ``pipe`` holds the base model with no diffkit feature attached (it is left bit-identical). Raises
    ``BaseModelMismatch`` (a ValueError) when the artifact was made for another base model,
    ``ArtifactError`` when it cannot be read, ValueError for a pruning spec or a non-empty ``out``.
    """
    check_exportable(artifact, out)
    out = Path(out)
    fs = features_of(pipe)
    if len(fs):
        raise ValueError(f"export needs the base model without features; this pipeline has {fs!r} attached")
    feature = fs.attach("erasure", str(Path(artifact)))  # reads the artifact whole, checks the base model
    try:
        names = sorted(feature.state.sidecar.get("tensor_names", feature.state.originals))
        components = sorted({q.split(".", 1)[0] for q in names})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
        try:
            for comp in components:
                getattr(pipe, comp).save_pretrained(tmp / comp, safe_serialization=True)
            side = feature.state.sidecar
            atomic_write_json(tmp / EXPORT_FILE, {
                "format": "diffkit.erasure-export/1", "artifact": str(Path(artifact).resolve()),
                "method": side.get("method"), "concept": side.get("concept"), "components": components,
                "tensor_names": names, "base_model": side.get("base_model"),
            })
            _share(tmp)
            if out.is_dir():
                out.rmdir()  # empty (checked above); os.replace would also replace it, but only on POSIX
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        feature.detach()
    return out


def _share(root: Path) -> None:
    """Folders 0777 and files 0666 minus the umask (mkdtemp makes a private 0700 folder)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
