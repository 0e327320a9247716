"""Per-pixel metrics: RMSE on the 0-255 scale, RMSE inside a mask, PSNR.

All functions take float NHWC images in [0, 1] (a single HWC image is treated
as a batch of one) and return one value per image, as a float32 array of
shape (N,). The papers we compare against (DiffDecompose, the LOGO watermark
papers) compute the metric per image, then report the mean over images:
``rmse(a, b).mean()``.

Definitions (the LOGO papers' evaluation code, e.g. SLBR's ``compute_RMSE``):
  rmse   = 255 * sqrt(mean_{h,w,c} (a - b)^2)
  rmse_w = sqrt(sum_{h,w,c} (255 (a - b) m)^2 / (C * (sum_{h,w} m + 1e-6)))
           (the RMSE inside the mask m; 0 for an empty mask)
  psnr   = 10 * log10(max_val^2 / mean_{h,w,c} (a - b)^2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:
    import jax
    from jax.typing import ArrayLike

__all__ = ["rmse", "rmse_masked", "psnr", "mse"]


def as_image_batch(a: ArrayLike, b: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Two float32 NHWC batches of the same shape (a single HWC image becomes a batch of one)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected NHWC (or HWC) images, got shape {a.shape}")
    return a, b


def mse(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Per-image mean squared error of float images (their own scale)."""
    a, b = as_image_batch(a, b)
    return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


def rmse(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Per-image RMSE on the 0-255 scale of float NHWC images in [0, 1]."""
    return 255.0 * jnp.sqrt(mse(a, b))


def rmse_masked(a: ArrayLike, b: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Per-image RMSE (0-255 scale) inside ``mask`` (the LOGO papers' RMSEw).

    ``mask``: (N, H, W), (N, H, W, 1), or (H, W) / (H, W, 1) shared by all
    images, with 1 where the watermark is. As in SLBR's evaluation, the squared error is
    weighted by ``mask**2`` and divided by ``C * sum(mask)`` (so a binary mask
    gives the mean over the masked pixels and all channels).
    """
    a, b = as_image_batch(a, b)
    m = jnp.asarray(mask, jnp.float32)
    n, h, w, channels = a.shape
    if m.ndim == 2 or (m.ndim == 3 and m.shape == (h, w, 1)):
        m = m.reshape(1, h, w, 1) if m.size == h * w else m
    elif m.ndim == 3:
        m = m[..., None]
    if m.ndim != 4 or m.shape[-1] != 1:
        raise ValueError(f"mask of shape {m.shape} does not fit images {a.shape}")
    m = jnp.broadcast_to(m, (n, h, w, 1))
    sq = jnp.sum(jnp.square((a - b) * m), axis=(1, 2, 3)) * 255.0**2
    return jnp.sqrt(sq / (channels * (jnp.sum(m, axis=(1, 2, 3)) + 1e-6)))


def psnr(a: ArrayLike, b: ArrayLike, max_val: float = 1.0, cap: float | None = None) -> jax.Array:
    """Per-image PSNR in dB: inf for identical images, or `cap` (the benchmarks' scripts return 100 dB there;
    no value is above `cap`)."""
    out = 10.0 * jnp.log10(max_val**2 / mse(a, b))
    return out if cap is None else jnp.minimum(out, cap)
