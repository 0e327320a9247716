"""Bilinear resizing exactly as PyTorch's ``F.interpolate(mode="bilinear",
align_corners=False)`` without antialiasing (what pytorch-fid does before its
InceptionV3): output pixel i samples the input at
``max(0, (i + 0.5) * in / out - 0.5)`` and mixes its two neighbours, the right
one clamped at the border. When downsampling this is *not* the same as
``jax.image.resize``, which antialiases.

Written as two small interpolation matrices applied with einsum.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jax.typing import ArrayLike

__all__ = ["interpolation_matrix", "resize_bilinear"]


@functools.lru_cache(maxsize=32)
def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's bilinear (align_corners=False) weights."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = (src - i0).astype(np.float32)
    lam0 = np.float32(1.0) - lam1
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m


def resize_bilinear(images: ArrayLike, size: tuple[int, int]) -> jax.Array:
    """Resize float NHWC ``images`` to ``size = (height, width)``."""
    x = jnp.asarray(images)
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    my = jnp.asarray(interpolation_matrix(h, size[0]))
    mx = jnp.asarray(interpolation_matrix(w, size[1]))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", my, x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", mx, x, precision=hp)
