"""SSIM (Wang, Bovik, Sheikh, Simoncelli 2004).

The default is the definition of dm-pix and ``tf.image.ssim``: an 11-tap
Gaussian window with sigma 1.5 (separable), k1 = 0.01, k2 = 0.03, the local
statistics of each channel computed over the *valid* part of the image only
(no padding), population (biased) variances, and the mean of the SSIM map over
rows, columns and channels. ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` gives the
same number (it filters with reflection, then crops the 5-pixel border).

``zero_pad=True`` selects the variant of the ``pytorch_ssim`` code that the
watermark-removal papers (SplitNet, SLBR, ...) report: the same window, but the
filter runs over the full image with zero padding (``F.conv2d(...,
padding=5)``) and the map is averaged over every pixel, borders included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.metrics.pixel import as_image_batch

if TYPE_CHECKING:
    from jax.typing import ArrayLike

__all__ = ["ssim", "gaussian_window"]


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps, centred (as dm-pix and tf.image.ssim)."""
    hw = size // 2
    shift = (2 * hw - size + 1) / 2
    x = (np.arange(size, dtype=np.float64) - hw + shift) / sigma
    w = np.exp(-0.5 * x**2)
    return (w / w.sum()).astype(np.float32)


def _blur(x, taps, zero_pad: bool):
    """Separable blur of NHWC ``x``, each channel on its own."""
    n, h, w, c = x.shape
    k = taps.shape[0]
    z = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w, 1)
    pad = [(k // 2, (k - 1) // 2)] if zero_pad else [(0, 0)]
    dn = ("NHWC", "HWIO", "NHWC")
    ky = jnp.asarray(taps).reshape(k, 1, 1, 1)
    kx = jnp.asarray(taps).reshape(1, k, 1, 1)
    hp = jax.lax.Precision.HIGHEST
    z = jax.lax.conv_general_dilated(z, ky, (1, 1), pad + [(0, 0)], dimension_numbers=dn,
                                     precision=hp)
    z = jax.lax.conv_general_dilated(z, kx, (1, 1), [(0, 0)] + pad, dimension_numbers=dn,
                                     precision=hp)
    ho, wo = z.shape[1], z.shape[2]
    return jnp.transpose(z.reshape(n, c, ho, wo), (0, 2, 3, 1))


def ssim(
    a: ArrayLike,
    b: ArrayLike,
    *,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    zero_pad: bool = False,
    return_map: bool = False,
) -> jax.Array:
    """Per-image SSIM of float NHWC images (``max_val`` is their range, 1.0 for [0, 1]).

    Returns an (N,) float32 array (the mean SSIM of each image over rows,
    columns and channels), or the SSIM map if ``return_map``. A single HWC
    image is treated as a batch of one.
    """
    a, b = as_image_batch(a, b)
    if not zero_pad and min(a.shape[1], a.shape[2]) < filter_size:
        raise ValueError(f"images of {a.shape[1]}x{a.shape[2]} are smaller than the "
                         f"{filter_size}-tap window (use zero_pad=True)")
    taps = gaussian_window(filter_size, filter_sigma)
    blur = lambda z: _blur(z, taps, zero_pad)  # noqa: E731

    mu_a, mu_b = blur(a), blur(b)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = blur(a * a) - mu_aa
    var_b = blur(b * b) - mu_bb
    cov = blur(a * b) - mu_ab
    # Round-off can make a variance slightly negative or |cov| > sqrt(var_a var_b);
    # clip as dm-pix does (a no-op on exact arithmetic).
    eps = np.finfo(np.float32).eps ** 2
    var_a = jnp.maximum(eps, var_a)
    var_b = jnp.maximum(eps, var_b)
    cov = jnp.sign(cov) * jnp.minimum(jnp.sqrt(var_a * var_b), jnp.abs(cov))

    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    ssim_map = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    if return_map:
        return ssim_map
    return jnp.mean(ssim_map, axis=(1, 2, 3))
