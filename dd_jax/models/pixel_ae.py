"""A weightless pixel-space "autoencoder": space-to-depth, for small CPU models.

It has the interface of the Flux autoencoder (`encode(images)` NHWC in
[-1, 1] -> latents NHWC, `decode(latents)` back), so a config switches
between the two. `factor` f folds f x f pixel blocks into 3 f^2 channels;
decoding is exact.
"""

from __future__ import annotations

import jax


class PixelAutoencoder:
    def __init__(self, factor: int = 4):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.latent_channels = 3 * factor * factor
        self.downsample = factor  # image pixels per latent pixel

    def encode(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of {f}")
        x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // f, w // f, f * f * c)

    def decode(self, latents: jax.Array) -> jax.Array:
        b, h, w, c = latents.shape
        f = self.factor
        x = latents.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * f, w * f, c // (f * f))

    def __repr__(self) -> str:
        return f"PixelAutoencoder(factor={self.factor})"
