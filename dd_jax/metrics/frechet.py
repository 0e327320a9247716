"""Frechet distance between two Gaussians, in float64 (numpy / scipy).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

FID is this distance between Gaussians fitted to the InceptionV3 pool
features of two image sets (``gaussian_statistics``). pytorch-fid evaluates
the last trace with ``scipy.linalg.sqrtm(S1 @ S2)`` (a non-symmetric matrix,
whose square root can pick up spurious imaginary parts). We use the identity
tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)) = sum of the singular
values of S2^(1/2) S1^(1/2), with symmetric square roots from ``eigh``. It is
the same number in exact arithmetic, involves no complex numbers, and stays
accurate for singular covariances (fewer samples than dimensions), where the
FID of a set against itself comes out ~0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["frechet_distance", "gaussian_statistics"]


def gaussian_statistics(features: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as ``np.cov(rowvar=False)``) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got {f.shape}")
    if f.shape[0] < 2:
        raise ValueError("need at least two samples for a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: npt.ArrayLike, sigma1: npt.ArrayLike, mu2: npt.ArrayLike, sigma2: npt.ArrayLike) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two Gaussians have different dimensions")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance {sigma1.shape} does not match mean {mu1.shape}")
    # Symmetrise: covariances from np.cov are symmetric up to round-off.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    # tr((S1^(1/2) S2 S1^(1/2))^(1/2)) is the nuclear norm of S2^(1/2) S1^(1/2):
    # summing its singular values avoids squaring the condition number.
    tr_covmean = np.sum(scipy.linalg.svdvals(_psd_sqrt(sigma2) @ _psd_sqrt(sigma1)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
