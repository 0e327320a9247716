"""Frechet distance against float64 scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from dd_jax import metrics
from dd_jax.metrics.fid import fid_from_features


def _scipy_reference(mu1, s1, mu2, s2):
    """pytorch-fid's formula, all in float64: sqrtm of the (non-symmetric) product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.max(np.abs(np.imag(covmean))) < 1e-6
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def _random_gaussian(rng, d):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=d), a @ a.T + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 8, 64])
def test_matches_scipy_float64(d):
    rng = np.random.default_rng(d)
    mu1, s1 = _random_gaussian(rng, d)
    mu2, s2 = _random_gaussian(rng, d)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    want = _scipy_reference(mu1, s1, mu2, s2)
    assert abs(got - want) <= 1e-6 * abs(want)
    # Symmetric; inputs in float32 are promoted to float64 before any arithmetic.
    assert abs(metrics.frechet_distance(mu2, s2, mu1, s1) - got) <= 1e-9 * abs(got)


def test_known_statistics_closed_forms():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert abs(got - want) <= 1e-9 * want
    # Same covariance, rotated by any orthogonal Q on both sides: only the means matter.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = q @ np.diag(a) @ q.T
    got = metrics.frechet_distance(mu1, s, mu2, s)
    assert abs(got - np.sum((mu1 - mu2) ** 2)) <= 1e-9 * np.trace(s)
    # Scalar case: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    assert abs(metrics.frechet_distance(1.0, 4.0, 3.0, 9.0) - (4.0 + 1.0)) < 1e-12


def test_set_against_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(20, 256)) * rng.uniform(0.1, 5, size=256)  # 20 samples, 256 dims
    mu, s = metrics.gaussian_statistics(feats)
    np.testing.assert_allclose(s, np.cov(feats, rowvar=False))
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    assert abs(fid_from_features(feats.astype(np.float32), feats.astype(np.float32))) < 1e-6
    other = rng.normal(size=(20, 256))
    assert fid_from_features(feats, other) > 1.0


@pytest.mark.slow
def test_set_against_itself_is_zero_at_fid_size():
    """As above at FID's 2048 dims with few samples (a few seconds of LAPACK)."""
    feats = np.random.default_rng(2).gamma(0.5, size=(10, 2048)).astype(np.float32)
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError):
        metrics.gaussian_statistics(np.zeros((1, 5)))
