"""RMSE (0-255), RMSE inside a mask (the LOGO papers' RMSEw) and PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from dd_jax import metrics


def _images(seed=0, shape=(3, 16, 12, 3)):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, size=shape), 0, 1).astype(np.float32)
    return a, b


def test_rmse_per_image_on_255_scale():
    a, b = _images()
    want = np.sqrt(np.mean((a.astype(np.float64) * 255 - b * 255.0) ** 2, axis=(1, 2, 3)))
    got = np.asarray(metrics.rmse(a, b))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # One grey level everywhere is an RMSE of 1; identical images give 0.
    z = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(np.asarray(metrics.rmse(z, z + 1 / 255)), 1.0, rtol=1e-5)
    assert float(metrics.rmse(a, a).max()) == 0.0
    # The papers' number is the mean of per-image values, not the RMSE of the pooled pixels.
    pooled = np.sqrt(np.mean((a - b.astype(np.float64)) ** 2)) * 255
    assert abs(float(np.mean(got)) - pooled) > 1e-4
    assert metrics.rmse(a[0], b[0]).shape == (1,)
    with pytest.raises(ValueError):
        metrics.rmse(a, b[:, :5])


def _slbr_rmse_w(pred, gt, mask):
    """SLBR's compute_RMSE(is_w=True), on 0-255 images and an (N, 1, H, W) mask (float64)."""
    pred = pred.transpose(0, 3, 1, 2).astype(np.float64) * 255
    gt = gt.transpose(0, 3, 1, 2).astype(np.float64) * 255
    mse = np.mean((pred * mask - gt * mask) ** 2, axis=(1, 2, 3))
    return np.sqrt(mse * np.prod(mask.shape[1:]) / (np.sum(mask, axis=(1, 2, 3)) + 1e-6))


def test_rmse_masked_matches_logo_papers_definition():
    a, b = _images(1)
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=(3, 16, 12)) > 0.6).astype(np.float32)
    want = _slbr_rmse_w(a, b, mask[:, None])
    for m in (mask, mask[..., None]):
        np.testing.assert_allclose(np.asarray(metrics.rmse_masked(a, b, m)), want, rtol=1e-5)
    # A binary mask gives the RMSE of the masked pixels.
    i = 0
    sel = mask[i].astype(bool)
    direct = np.sqrt(np.mean((a[i][sel].astype(np.float64) - b[i][sel]) ** 2)) * 255
    np.testing.assert_allclose(float(metrics.rmse_masked(a, b, mask)[i]), direct, rtol=1e-5)
    # A shared (H, W) mask; an all-ones mask is plain RMSE; an empty one gives 0.
    np.testing.assert_allclose(np.asarray(metrics.rmse_masked(a, b, mask[0])),
                               _slbr_rmse_w(a, b, np.broadcast_to(mask[:1, None], (3, 1, 16, 12))),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.rmse_masked(a, b, np.ones((16, 12)))),
                               np.asarray(metrics.rmse(a, b)), rtol=1e-5)
    assert float(metrics.rmse_masked(a, b, np.zeros((16, 12))).max()) == 0.0
    with pytest.raises(ValueError):
        metrics.rmse_masked(a, b, np.ones((3, 16, 12, 3)))


def test_psnr():
    a, b = _images(2)
    mse = np.mean((a.astype(np.float64) - b) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), 10 * np.log10(1 / mse), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.psnr(a * 255, b * 255, max_val=255.0)),
                               10 * np.log10(1 / mse), rtol=1e-4)
    assert np.isinf(np.asarray(metrics.psnr(a, a))).all()
