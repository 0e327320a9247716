"""LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), Flax NNX, NHWC.

As the ``lpips`` package computes it (``lpips.LPIPS(net="alex", version="0.1")``):
inputs in [-1, 1] are shifted and scaled per channel (``ScalingLayer``:
shift (-.030, -.088, -.188), scale (.458, .448, .450)), run through
torchvision's AlexNet ``features`` and tapped after the ReLUs of its five convs
(indices 1, 4, 7, 9, 11: 64, 192, 384, 256, 256 channels). Each tap is
unit-normalised over channels (``x / (||x|| + 1e-10)``), the squared difference
of the two images' taps is weighted per channel by the linear head
(``lin{k}``: a 1x1 conv without bias, weights >= 0), averaged over space, and
the five layer scores are summed.

The backbone weights are torchvision's ImageNet AlexNet; the heads ship with the
``lpips`` package (``lpips/weights/v0.1/alex.pth``). Convert them with
``python scripts/convert_metrics_weights.py lpips ...`` and load with ``load``:

    model = lpips.load("lpips_alex.safetensors")
    d = lpips.distance(model, a, b)          # NHWC in [0, 1] -> (N,)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax.metrics.weights import load_module

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["LPIPS", "AlexNetFeatures", "load", "distance", "FORMAT", "SHIFT", "SCALE"]

FORMAT = "lpips-alex-v0.1"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
_HIGHEST = jax.lax.Precision.HIGHEST


def _max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class AlexNetFeatures(nnx.Module):
    """torchvision AlexNet ``features``; returns the five ReLU taps LPIPS uses.

    conv1..conv5 are torchvision's ``features.0, .3, .6, .8, .10``.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        def conv(cin, cout, k, stride, pad):
            return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                            padding=((pad, pad), (pad, pad)), precision=_HIGHEST, rngs=rngs)

        self.conv1 = conv(3, 64, 11, 4, 2)
        self.conv2 = conv(64, 192, 5, 1, 2)
        self.conv3 = conv(192, 384, 3, 1, 1)
        self.conv4 = conv(384, 256, 3, 1, 1)
        self.conv5 = conv(256, 256, 3, 1, 1)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        relu1 = jax.nn.relu(self.conv1(x))
        relu2 = jax.nn.relu(self.conv2(_max_pool(relu1)))
        relu3 = jax.nn.relu(self.conv3(_max_pool(relu2)))
        relu4 = jax.nn.relu(self.conv4(relu3))
        relu5 = jax.nn.relu(self.conv5(relu4))
        return relu1, relu2, relu3, relu4, relu5


class LinearHead(nnx.Module):
    """lpips' ``NetLinLayer``: a per-channel weighting (1x1 conv to one channel, no bias)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (channels,)) / channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("nhwc,c->nhw", x, self.weight[...], precision=_HIGHEST)


def _unit_normalize(x, eps: float = 1e-10):
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


class LPIPS(nnx.Module):
    """LPIPS distance of NHWC image pairs in [-1, 1]; returns (N,)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.net = AlexNetFeatures(rngs=rngs)
        self.lin0 = LinearHead(CHANNELS[0], rngs=rngs)
        self.lin1 = LinearHead(CHANNELS[1], rngs=rngs)
        self.lin2 = LinearHead(CHANNELS[2], rngs=rngs)
        self.lin3 = LinearHead(CHANNELS[3], rngs=rngs)
        self.lin4 = LinearHead(CHANNELS[4], rngs=rngs)

    def scale(self, x: jax.Array) -> jax.Array:
        shift = jnp.asarray(SHIFT, x.dtype)
        scale = jnp.asarray(SCALE, x.dtype)
        return (x - shift) / scale

    def per_layer(self, x0: jax.Array, x1: jax.Array) -> list[jax.Array]:
        """The five layer scores, each (N,)."""
        n = x0.shape[0]
        taps = self.net(self.scale(jnp.concatenate([x0, x1], axis=0)))
        heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        out = []
        for tap, head in zip(taps, heads):
            f0, f1 = _unit_normalize(tap[:n]), _unit_normalize(tap[n:])
            out.append(jnp.mean(head(jnp.square(f0 - f1)), axis=(1, 2)))
        return out

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        return sum(self.per_layer(x0, x1))


def load(path: str | os.PathLike) -> LPIPS:
    """LPIPS with converted weights (see scripts/convert_metrics_weights.py)."""
    return load_module(lambda: LPIPS(rngs=nnx.Rngs(0)), path, FORMAT)


@nnx.jit
def _distance(model: LPIPS, a, b):
    return model(2.0 * a.astype(jnp.float32) - 1.0, 2.0 * b.astype(jnp.float32) - 1.0)


def distance(model: LPIPS, a: npt.ArrayLike, b: npt.ArrayLike, batch_size: int = 32) -> np.ndarray:
    """Per-image LPIPS of float NHWC images in [0, 1] (lpips' ``normalize=True``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    out = []
    for i in range(0, a.shape[0], batch_size):
        ca, cb = a[i:i + batch_size], b[i:i + batch_size]
        n = ca.shape[0]
        if n < batch_size and a.shape[0] > batch_size:  # keep one compiled shape
            ca = np.concatenate([ca, np.repeat(ca[-1:], batch_size - n, axis=0)])
            cb = np.concatenate([cb, np.repeat(cb[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(_distance(model, jnp.asarray(ca), jnp.asarray(cb)))[:n])
    return np.concatenate(out, axis=0)
