"""Accuracy of the shipped oracle on fresh renders, degraded renders and VAE round trips.

    python benchmarks/oracle_accuracy.py            # 2048 renders (seed 777), 1024 of them through the VAE
    python benchmarks/oracle_accuracy.py --smoke    # 64 renders, to check the script

Three readings of the same fresh renders (full pose range, a seed used neither in training nor in the
training-time evaluation): as rendered; after a 3x3 binomial blur and Gaussian noise (sigma 0.04 of the
range), the softness of generated images; and encoded + decoded by the reference pipeline's VAE (posterior
mean), the ceiling for judging generated images. Writes benchmarks/results/oracle_accuracy.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402

from diffkit.zoo import load_reference_pipeline  # noqa: E402
from diffkit.zoo.classifier import load_reference_classifier  # noqa: E402
from diffkit.zoo.shapes import FACTORS, render, sample_spec  # noqa: E402
from diffkit.zoo.train_vae import to_tensor  # noqa: E402


def accuracy(clf, images: np.ndarray, specs) -> dict[str, float]:
    pred = clf.classify(images).labels
    return {f: float(np.mean([p == getattr(s, f) for p, s in zip(pred[f], specs)])) for f in FACTORS}


def blur_and_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """3x3 binomial blur, then Gaussian noise of std ``sigma`` (fraction of the range), as uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3) / 255
    x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    out = [vae.decode(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean).sample
           for i in range(0, len(images), batch)]
    return ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="fresh renders")
    p.add_argument("--vae-n", type=int, default=1024, help="how many of them go through the VAE")
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="64 renders: checks the script")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.vae_n = 64, 32
    if not 1 <= a.vae_n <= a.n:
        p.error(f"--vae-n must be in [1, --n={a.n}], got {a.vae_n}")
    torch.set_num_threads(a.threads)

    clf = load_reference_classifier()
    rng = np.random.default_rng(a.seed)
    specs = [sample_spec(rng) for _ in range(a.n)]
    images = np.stack([render(s) for s in specs])
    rec = vae_round_trip(load_reference_pipeline().vae, images[: a.vae_n])
    readings = {
        "renders": (accuracy(clf, images, specs), a.n),
        "blur_and_noise": (accuracy(clf, blur_and_noise(images, 0.04, a.seed), specs), a.n),
        "vae_round_trip": (accuracy(clf, rec, specs[: a.vae_n]), a.vae_n),
    }
    rows = [{"reading": k, "n": n, **{f: round(100 * v, 2) for f, v in acc.items()}}
            for k, (acc, n) in readings.items()]
    print_table(rows)
    vae_psnr = psnr(rec, images[: a.vae_n])
    print(f"VAE round trip PSNR {vae_psnr:.1f} dB")
    payload = {
        "benchmark": "oracle_accuracy",
        "environment": environment(),
        "setting": {"n": a.n, "vae_n": a.vae_n, "seed": a.seed, "noise_sigma": 0.04, "smoke": a.smoke},
        "results": {k: {"n_images": n, "accuracy": acc} for k, (acc, n) in readings.items()},
        "vae_round_trip_psnr_db": vae_psnr,
        "bar": {"renders": 0.98},
        "passed": all(v >= 0.98 for v in readings["renders"][0].values()),
    }
    path = write_json("oracle_accuracy_smoke.json" if a.smoke else "oracle_accuracy.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
