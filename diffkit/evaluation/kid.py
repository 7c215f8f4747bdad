"""Kernel Inception Distance (Binkowski et al., ICLR 2018, "Demystifying MMD GANs"), on any features.

KID is the unbiased estimator of the squared maximum mean discrepancy with the cubic polynomial kernel

    k(x, y) = (x . y / d + 1) ** 3                       (d = feature dimension)

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(m n) sum_{i, j} k(x_i, y_j)

averaged over ``n_subsets`` random subsets of ``subset_size`` samples drawn without replacement from each
set (the paper's protocol; its reference code uses 100 subsets of 1000). Unlike FID it is unbiased, so it
is meaningful with the few hundred images a CPU can generate.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().double()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D) of features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (x . y / d + coef0) ** degree for every row pair; shape (len(x), len(y))."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y) -> float:
    """The unbiased MMD^2 estimate between feature sets ``x`` (m, d) and ``y`` (n, d), m, n >= 2."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 samples per set, got {m} and {n}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(features_a, features_b, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets: (mean, standard deviation) of MMD^2_u over random subsets.

    ``subset_size`` is capped at the size of the smaller set (then every subset of that set is the whole
    set, and only the other set is subsampled). Deterministic for a given ``seed``.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < 1:
        raise ValueError(f"n_subsets must be an integer >= 1, got {n_subsets!r}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"kid needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        ia = torch.randperm(len(a), generator=gen)[:size]
        ib = torch.randperm(len(b), generator=gen)[:size]
        values.append(mmd2_unbiased(a[ia], b[ib]))
    v = np.asarray(values)
    return float(v.mean()), float(v.std())
