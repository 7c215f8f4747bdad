"""Train the shapes-world oracle (``diffkit.zoo.classifier``) on freshly rendered images.

    python -m diffkit.zoo.train_classifier --out diffkit/zoo/reference/classifier

Batches are rendered anew from ``sample_spec`` (random factors, position, size, rotation); each serves a
few consecutive steps under random symmetries of the square, so the network sees every image only a few
times and cannot memorise. A mild blur / noise augmentation makes it robust to the softness of VAE-decoded
images; the reported accuracy is measured on clean, fresh renders from a separate seed. Single-threaded and
deterministic: the same seed and versions give bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import REFERENCE_DIR, ClassifierConfig, ShapesClassifier, save_classifier


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train_classifier`` (defaults reproduce the shipped weights)."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    #: Each rendered batch serves ``reuse`` consecutive steps, the later ones under a random symmetry of the
    #: square (flips / quarter turns keep every label): rendering costs about as much as a training step.
    reuse: int = 4
    lr: float = 4e-3
    weight_decay: float = 1e-4
    #: Probability of each augmentation per image, and their strengths.
    blur_prob: float = 0.3
    noise_prob: float = 0.3
    noise_std: float = 0.04
    eval_n: int = 1024
    eval_seed: int = 10_000

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_n", "reuse"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("blur_prob", "noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


def render_batch(rng: np.random.Generator, n: int, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n fresh renders as (n, 3, size, size) float in [0, 1], and factor -> (n,) label indices."""
    from .shapes import FACTORS, render, sample_spec

    specs = [sample_spec(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([render(s, size) for s in specs])).permute(0, 3, 1, 2).float() / 255.0
    y = {f: torch.tensor([values.index(getattr(s, f)) for s in specs]) for f, values in FACTORS.items()}
    return x, y


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random symmetry of the square (of 8) for the whole batch: labels are invariant under all."""
    k = int(torch.randint(8, (1,), generator=gen))
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return x.flip(3) if k >= 4 else x


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image random 3x3 Gaussian blur and additive Gaussian noise (image-space, colors unchanged)."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 0.8 + 0.4
    k1 = torch.exp(-(torch.arange(-1.0, 2.0)[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # (n, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate").reshape(1, n * 3, x.shape[2] + 2, x.shape[3] + 2)
    # one depthwise conv over all images: channel group i*3+c uses image i's kernel
    blurred = F.conv2d(padded, k2.repeat_interleave(3, dim=0)[:, None], groups=n * 3).reshape_as(x)
    use_blur = (torch.rand(n, generator=gen) < cfg.blur_prob)[:, None, None, None]
    x = torch.where(use_blur, blurred, x)
    use_noise = (torch.rand(n, generator=gen) < cfg.noise_prob)[:, None, None, None]
    noise = torch.randn(x.shape, generator=gen) * cfg.noise_std
    return torch.where(use_noise, x + noise, x).clamp_(0.0, 1.0)


@torch.no_grad()
def evaluate(model: ShapesClassifier, n: int, seed: int, batch_size: int = 256) -> dict[str, float]:
    """Per-factor accuracy on ``n`` clean fresh renders drawn with ``seed``."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    correct = {f: 0 for f in model.factors}
    done = 0
    while done < n:
        x, y = render_batch(rng, min(batch_size, n - done), model.config.image_size)
        logits = model(x)
        for f in model.factors:
            correct[f] += int((logits[f].argmax(-1) == y[f]).sum())
        done += len(x)
    model.train(was_training)
    return {f: c / n for f, c in correct.items()}


def _record(cfg: TrainConfig, model: ShapesClassifier, step: int, seconds: float, acc: dict) -> dict:
    return dict(
        config=asdict(cfg),
        steps_done=step,
        complete=step == cfg.steps,
        train_seconds=round(seconds, 1),
        eval_accuracy=acc,
        eval_images=cfg.eval_n,
        eval_seed=cfg.eval_seed,
        device="cpu",
        threads=torch.get_num_threads(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__),
    )


def train_classifier(cfg: TrainConfig = TrainConfig(), progress: bool = True, snapshot_dir: str | Path | None = None,
                     snapshot_every: int = 500) -> ShapesClassifier:
    """Train an oracle from scratch; returns it in eval mode with its training record in ``config.train``.

    With ``snapshot_dir``, every ``snapshot_every`` steps the current model (with its accuracy so far) is
    saved there atomically, so a usable oracle exists while training goes on. Snapshots do not touch the
    training's random streams: the final weights are the same with or without them.
    """
    from .shapes import FACTORS

    torch.manual_seed(cfg.seed)
    model = ShapesClassifier(ClassifierConfig(factors=dict(FACTORS))).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # one cycle: warm up over the first 10% of steps, then cosine-anneal (Smith & Topin, 2019)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train oracle", unit="step", disable=not progress)
    for step in bar:
        if step % cfg.reuse == 0:
            x_clean, y = render_batch(rng, cfg.batch_size, model.config.image_size)
        x = augment(dihedral(x_clean, gen) if step % cfg.reuse else x_clean, cfg, gen)
        logits = model(x.contiguous(memory_format=torch.channels_last))  # channels-last convs are faster on CPU
        loss = sum(F.cross_entropy(logits[f], y[f]) for f in model.factors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if snapshot_dir is not None and done % snapshot_every == 0 and done < cfg.steps:
            acc = evaluate(model, cfg.eval_n, cfg.eval_seed)
            bar.write(f"step {done}: eval accuracy {acc}")
            snap = ShapesClassifier(replace(model.config, train=_record(cfg, model, done, time.perf_counter() - t0,
                                                                         acc)))
            snap.load_state_dict(model.state_dict())
            save_classifier(snap, snapshot_dir)
    train_seconds = time.perf_counter() - t0
    model.eval()
    acc = evaluate(model, cfg.eval_n, cfg.eval_seed)
    model.config = replace(model.config, train=_record(cfg, model, cfg.steps, train_seconds, acc))
    return model.to(memory_format=torch.contiguous_format)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffkit.zoo.train_classifier",
                                description="Train the shapes-world oracle classifier on fresh renders.")
    p.add_argument("--out", default=str(REFERENCE_DIR), help=f"output folder (default {REFERENCE_DIR})")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: leave cores to others)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_n=args.eval_n)
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as e:
        print(f"train_classifier: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = train_classifier(cfg, progress=not args.quiet, snapshot_dir=args.out)
    out = save_classifier(model, args.out)
    print(json.dumps({"out": str(out), **{k: model.config.train[k] for k in ("train_seconds", "eval_accuracy")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
