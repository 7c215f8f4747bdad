"""Frechet distance between Gaussians fitted to two feature sets (Heusel et al., NeurIPS 2017: FID).

    FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b; this avoids a general (complex)
matrix square root. Covariances use the unbiased (N - 1) normalisation, as the reference implementation.
FID is biased for small N; prefer KID (``diffkit.evaluation.kid``) for a few hundred images.
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    for name, s in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {s.shape}")
    if mu_b.shape != (d,):
        raise ValueError(f"mu_b must have shape ({d},), got {mu_b.shape}")
    root_a = _sqrt_psd((sigma_a + sigma_a.T) / 2)
    middle = root_a @ sigma_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N - 1) of a feature set (N, D), N >= 2."""
    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be a 2-D array (N, D) with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def fid(features_a, features_b) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    mu_a, s_a = gaussian_stats(features_a)
    mu_b, s_b = gaussian_stats(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, s_a, mu_b, s_b)
