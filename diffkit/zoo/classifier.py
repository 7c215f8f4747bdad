"""The oracle: a small CNN that reads the four factors of a shapes-world image.

Every quality figure of the reference model stands on this classifier: concept accuracy (object, color,
style, background of a generated image), the erasure metrics (UA / IRA / CRA) and, through its pooled
penultimate features, KID / FID. It is trained by ``python -m diffkit.zoo.train_classifier`` on freshly
rendered images and shipped as ``reference/classifier/{model.safetensors,config.json}``.

Inputs (``classify`` / ``features``) are converted by ``diffkit.evaluation.images.to_float_images``:
PIL RGB images or uint8 arrays need nothing; float arrays / tensors need ``value_range=(0, 1)`` or
``(-1, 1)``. Images of another size are resized (bilinear, antialiased) to the trained size.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..evaluation.images import to_float_images

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Where the shipped oracle lives (inside the package, so it installs with it).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and label order of the oracle (stored as the JSON sidecar of its weights)."""

    factors: dict[str, tuple[str, ...]]
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 48, 96, 128, 128)
    feature_dim: int = 128
    #: Training record (seed, steps, time, measured accuracy); informational only.
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.factors:
            raise ValueError("factors must name at least one factor with its labels")
        for name, labels in self.factors.items():
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"factor {name!r} needs at least 2 distinct labels, got {labels!r}")
        if len(self.channels) < 3:
            raise ValueError(f"channels needs at least 3 layers, got {self.channels}")
        factor = 2 ** (len(self.channels) - 2)
        if self.image_size < 16 or self.image_size % factor:
            raise ValueError(f"image_size must be >= 16 and divisible by {factor}, got {self.image_size}")
        if self.feature_dim < 1 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels and feature_dim must be positive, got {self.channels}, {self.feature_dim}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["factors"] = {k: list(v) for k, v in self.factors.items()}
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClassifierConfig:
        known = {"factors", "image_size", "channels", "feature_dim", "train"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}")
        return cls(
            factors={k: tuple(v) for k, v in d["factors"].items()},
            image_size=int(d.get("image_size", 64)),
            channels=tuple(d.get("channels", (16, 32, 48, 96, 128, 128))),
            feature_dim=int(d.get("feature_dim", 128)),
            train=dict(d.get("train", {})),
        )


@dataclass(frozen=True)
class Classification:
    """Result of ``ShapesClassifier.classify`` for N images; every dict is keyed by factor."""

    labels: dict[str, list[str]]  # predicted label names
    indices: dict[str, torch.Tensor]  # (N,) int64 label indices (order of ``config.factors``)
    probs: dict[str, torch.Tensor]  # (N, K) softmax probabilities


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ShapesClassifier(nn.Module):
    """A small CNN: a thin full-resolution layer (stripes and dots are 4 px wide), a stride-2 layer, then
    conv-BN-ReLU blocks with 2x max-pooling between them (64 px -> 4 x 4); global average and max pooling,
    a shared ``feature_dim`` embedding (the KID / FID features) and one linear head per factor."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [_block(3, c[0]), _block(c[0], c[1], stride=2)]
        for i in range(2, len(c)):
            if i > 2:
                layers.append(nn.MaxPool2d(2))
            layers.append(_block(c[i - 1], c[i]))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(2 * c[-1], config.feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({f: nn.Linear(config.feature_dim, len(v)) for f, v in config.factors.items()})

    @property
    def factors(self) -> dict[str, tuple[str, ...]]:
        return self.config.factors

    # -- tensor interface (training) -----------------------------------------------------------
    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float in [0, 1] -> (N, feature_dim) penultimate features."""
        h = self.trunk((x - 0.5) / 0.25)
        # max pooling keeps small, local evidence (a few dots, a thin outline) that averaging would dilute
        return self.embed(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, S, S) float in [0, 1] -> factor -> logits (N, K)."""
        z = self.embedding(x)
        return {f: head(z) for f, head in self.heads.items()}

    # -- image interface (evaluation) ----------------------------------------------------------
    def prepare(self, images, value_range=None) -> torch.Tensor:
        """Any accepted image batch -> (N, 3, S, S) float in [0, 1] on the model's device."""
        x = to_float_images(images, value_range)
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        return x.to(next(self.parameters()).device)

    def _batched(self, fn, images, value_range, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = self.prepare(images, value_range)
        with torch.no_grad():
            outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return outs

    def features(self, images, value_range=None, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, feature_dim) on CPU, float32: the embedding for KID / FID."""
        outs = self._batched(self.embedding, images, value_range, batch_size)
        return torch.cat(outs).float().cpu()

    def classify(self, images, value_range=None, batch_size: int = 256) -> Classification:
        """Predict every factor of every image: label names, indices and probabilities."""
        outs = self._batched(self.forward, images, value_range, batch_size)
        probs = {f: torch.cat([o[f] for o in outs]).float().softmax(dim=-1).cpu() for f in self.factors}
        indices = {f: p.argmax(dim=-1) for f, p in probs.items()}
        labels = {f: [self.factors[f][i] for i in idx.tolist()] for f, idx in indices.items()}
        return Classification(labels=labels, indices=indices, probs=probs)


def save_classifier(model: ShapesClassifier, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` to ``directory``, each atomically (temp + replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "model": "diffkit.zoo.classifier.ShapesClassifier"})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; package data must be world-readable
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(model.config.to_json(), f, indent=2)  # key order = factor order
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load a classifier saved by ``save_classifier``; returned in eval mode on ``device``."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"classifier directory {str(directory)!r} has no {name}; "
                                    "train one with: python -m diffkit.zoo.train_classifier --out DIR")
    config = ClassifierConfig.from_json(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
    model = ShapesClassifier(config)
    state = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier weights in {str(directory)!r} do not match its config: "
                         f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return model.to(device).eval()


def load_reference_classifier(device: str | torch.device = "cpu") -> ShapesClassifier:
    """The shipped oracle for the shapes world (eval mode). See the module docstring for inputs."""
    return load_classifier(REFERENCE_DIR, device)
