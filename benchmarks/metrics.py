"""Generation-quality metrics that do not depend on a modality: the Fréchet distance.

``FD(a, b) = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` between Gaussians fitted
to two feature sets (FID when the features come from Inception-v3, FVD from I3D / VideoMAE, FAD
from an audio model; the feature extractor is the caller's). The matrix square root's trace is
computed as ``sum(sqrt(eig(A^{1/2} S_b A^{1/2})))`` with ``A = S_a`` symmetric PSD: the
eigenvalues of ``S_a S_b`` and of that symmetric matrix are the same, so no non-symmetric
``sqrtm`` (and no scipy) is needed, and tiny negative eigenvalues from round-off clip to 0.
Everything runs in float64 numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "frechet_distance_from_stats", "gaussian_stats"]


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, ``N - 1``) of features ``[N, D]``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape} vs {mu_b.shape}")
    root = _psd_sqrt(cov_a)
    eig = np.linalg.eigvalsh(root @ cov_b @ root)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu_a - mu_b
    return float(max(0.0, diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to features ``[N_a, D]`` and ``[N_b, D]``."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
