"""SSIM against dm-pix, scikit-image and the zero-padded pytorch_ssim definition."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dd_jax import metrics
from dd_jax.metrics.structural import gaussian_window


def _pairs(seed=0, shape=(4, 33, 47, 3)):
    """Random pairs of two kinds: independent, and strongly correlated."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape).astype(np.float32)
    b = rng.uniform(size=shape).astype(np.float32)
    c = np.clip(a + rng.normal(0, 0.1, size=shape), 0, 1).astype(np.float32)
    smooth = np.cumsum(rng.normal(size=shape), axis=2)  # low-frequency content
    smooth = ((smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.float32)
    s2 = np.clip(smooth * 0.8 + 0.1 + rng.normal(0, 0.02, size=shape), 0, 1).astype(np.float32)
    return [(a, b), (a, c), (smooth, s2)]


def test_matches_dm_pix():
    pix = pytest.importorskip("dm_pix")
    for a, b in _pairs():
        got = np.asarray(metrics.ssim(a, b))
        want = np.asarray(pix.ssim(a, b))
        assert got.shape == (a.shape[0],)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_matches_skimage_gaussian_population_covariance():
    from skimage.metrics import structural_similarity

    for a, b in _pairs(1, shape=(3, 40, 36, 3)):
        got = np.asarray(metrics.ssim(a, b))
        want = [structural_similarity(x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False)
                for x, y in zip(a.astype(np.float64), b.astype(np.float64))]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _pytorch_ssim_reference(a, b):
    """The watermark papers' pytorch_ssim: 11x11 Gaussian conv with zero padding 5."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = torch.tensor([np.exp(-((x - 5) ** 2) / (2 * 1.5**2)) for x in range(11)],
                     dtype=torch.float64)
    g = g / g.sum()
    c = a.shape[-1]
    window = (g[:, None] @ g[None, :]).expand(c, 1, 11, 11).contiguous()
    x = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2)
    y = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2)

    def blur(z):
        return F.conv2d(z, window, padding=5, groups=c)

    mu1, mu2 = blur(x), blur(y)
    s11 = blur(x * x) - mu1**2
    s22 = blur(y * y) - mu2**2
    s12 = blur(x * y) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def test_zero_padded_variant_matches_pytorch_ssim_definition():
    for a, b in _pairs(2, shape=(2, 24, 30, 3)):
        got = np.asarray(metrics.ssim(a, b, zero_pad=True))
        np.testing.assert_allclose(got, _pytorch_ssim_reference(a, b), rtol=0, atol=1e-5)
    # The variants differ (borders), and zero padding also works below the window size.
    a, b = _pairs(3, shape=(1, 16, 16, 3))[1]
    assert abs(float(metrics.ssim(a, b)[0]) - float(metrics.ssim(a, b, zero_pad=True)[0])) > 1e-4
    assert metrics.ssim(a[:, :8, :8], b[:, :8, :8], zero_pad=True).shape == (1,)


def test_properties():
    a, b = _pairs(4, shape=(2, 20, 20, 3))[1]
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-6)
    # A single HWC image is a batch of one; jit works; the map has the valid size.
    assert metrics.ssim(a[0], b[0]).shape == (1,)
    np.testing.assert_allclose(np.asarray(jax.jit(metrics.ssim)(a, b)),
                               np.asarray(metrics.ssim(a, b)), atol=1e-6)
    assert metrics.ssim(a, b, return_map=True).shape == (2, 10, 10, 3)
    # Symmetric in its arguments.
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, b)), np.asarray(metrics.ssim(b, a)),
                               atol=1e-7)
    w = gaussian_window()
    assert w.shape == (11,) and abs(w.sum() - 1) < 1e-6 and w.argmax() == 5
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(a[:, :8], b[:, :8])
    with pytest.raises(ValueError, match="differ"):
        metrics.ssim(a, b[:, :19])
