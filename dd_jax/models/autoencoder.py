"""The Flux autoencoder (a KL VAE with 16 latent channels) in Flax NNX, NHWC.

Module names follow BFL's `ae.py` (`encoder.down.N.block.M`,
`encoder.mid.attn_1`, `decoder.up.N.upsample`, `norm_out`), so BFL's
`ae.safetensors` maps 1:1 and a diffusers `AutoencoderKL` folder through one
table (`weights_conversion/autoencoder.py`). As in BFL, `decoder.up[i]` is
the level at resolution i (run from the lowest resolution up), which is
diffusers' `up_blocks[n - 1 - i]`. The attention's q/k/v/proj_out are
Linear layers (diffusers' layout; BFL's 1x1 convs convert to them).

    ae = autoencoder.load(path)
    latents = ae.encode(images)    # images NHWC in [-1, 1] -> (mean - shift) * scale, NHWC
    images = ae.decode(latents)    # inverse: latents / scale + shift, then the decoder

GroupNorms and the attention softmax run in float32 whatever the compute
dtype. `pack` / `unpack` (2x2 latent patches <-> transformer tokens) are
re-exported from `dd_jax.icd`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from dd_jax.models import layers, store
from dd_jax.models.layers import Precision

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from dd_jax.models.store import Shardings

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AutoEncoderParams:
    """Architecture and latent normalisation (diffusers' AutoencoderKL config names)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoEncoderParams:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


PRESETS: dict[str, AutoEncoderParams] = {
    "flux": AutoEncoderParams(),
    "tiny": AutoEncoderParams(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
}


def __getattr__(name: str) -> Any:  # re-export without a second copy, and without importing icd eagerly
    if name in ("pack", "unpack"):
        from dd_jax import icd

        return getattr(icd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class GroupNorm(nnx.Module):
    """GroupNorm with affine `scale` / `bias`, computed in float32 (eps 1e-6)."""

    def __init__(self, channels: int, groups: int, prec: Precision, eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), prec.param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), prec.param_dtype))

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def conv(cin: int, cout: int, kernel: int, prec: Precision, rngs: nnx.Rngs, stride: int = 1,
         padding: Any = None) -> nnx.Conv:
    if padding is None:
        padding = [(kernel // 2, kernel // 2)] * 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=prec.dtype,
                    param_dtype=prec.param_dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int, prec: Precision, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, prec)
        self.conv1 = conv(cin, cout, 3, prec, rngs)
        self.norm2 = GroupNorm(cout, groups, prec)
        self.conv2 = conv(cout, cout, 3, prec, rngs)
        self.nin_shortcut = conv(cin, cout, 1, prec, rngs) if cin != cout else None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int, prec: Precision, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups, prec)
        self.q = layers.linear(channels, channels, prec, rngs)
        self.k = layers.linear(channels, channels, prec, rngs)
        self.v = layers.linear(channels, channels, prec, rngs)
        self.proj_out = layers.linear(channels, channels, prec, rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        hs = self.norm(x).reshape(b, h * w, 1, c)  # [B, L, heads=1, C]
        q, k, v = self.q(hs), self.k(hs), self.v(hs)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", probs, v)
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (0 top/left, 1 bottom/right)."""

    def __init__(self, channels: int, prec: Precision, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, prec, rngs, stride=2, padding=[(0, 1), (0, 1)])

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, prec: Precision, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, prec, rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution: resnet `block`s, then an optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, prec: Precision, rngs: nnx.Rngs, *,
                 downsample: bool = False, upsample: bool = False):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, prec, rngs) for i in range(n_blocks)])
        self.downsample = Downsample(cout, prec, rngs) if downsample else None
        self.upsample = Upsample(cout, prec, rngs) if upsample else None

    def __call__(self, x: Array) -> Array:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, channels: int, groups: int, attention: bool, prec: Precision, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, groups, prec, rngs)
        self.attn_1 = AttnBlock(channels, groups, prec, rngs) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups, prec, rngs)

    def __call__(self, x: Array) -> Array:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    def __init__(self, p: AutoEncoderParams, prec: Precision, rngs: nnx.Rngs):
        chans, groups = p.block_out_channels, p.norm_num_groups
        self.conv_in = conv(p.in_channels, chans[0], 3, prec, rngs)
        self.down = nnx.List([
            Level(chans[max(i - 1, 0)], c, p.layers_per_block, groups, prec, rngs, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        ])
        self.mid = Mid(chans[-1], groups, p.mid_block_add_attention, prec, rngs)
        self.norm_out = GroupNorm(chans[-1], groups, prec)
        self.conv_out = conv(chans[-1], 2 * p.latent_channels, 3, prec, rngs)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(nnx.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, p: AutoEncoderParams, prec: Precision, rngs: nnx.Rngs):
        chans, groups = p.block_out_channels, p.norm_num_groups
        n = len(chans)
        self.conv_in = conv(p.latent_channels, chans[-1], 3, prec, rngs)
        self.mid = Mid(chans[-1], groups, p.mid_block_add_attention, prec, rngs)
        # up[i] works at resolution level i; its input comes from level i + 1 (or the mid block)
        self.up = nnx.List([
            Level(chans[min(i + 1, n - 1)], chans[i], p.layers_per_block + 1, groups, prec, rngs, upsample=i > 0)
            for i in range(n)
        ])
        self.norm_out = GroupNorm(chans[0], groups, prec)
        self.conv_out = conv(chans[0], p.out_channels, 3, prec, rngs)

    def __call__(self, z: Array) -> Array:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(nnx.silu(self.norm_out(x)))


class AutoEncoder(nnx.Module):
    def __init__(self, params: AutoEncoderParams, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 dtype: DTypeLike | None = None):
        self.params = params
        prec = Precision(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype or param_dtype))
        self.dtype = prec.dtype
        zc = 2 * params.latent_channels
        self.encoder = Encoder(params, prec, rngs)
        self.decoder = Decoder(params, prec, rngs)
        self.quant_conv = conv(zc, zc, 1, prec, rngs) if params.use_quant_conv else None
        lc = params.latent_channels
        self.post_quant_conv = conv(lc, lc, 1, prec, rngs) if params.use_post_quant_conv else None

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel (8 for Flux)."""
        return self.params.downsample_factor

    def moments(self, images: Array) -> tuple[Array, Array]:
        """Raw posterior (mean, logvar), NHWC float32, before scale and shift."""
        h = self.encoder(jnp.asarray(images).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: Array, key: jax.Array | None = None) -> Array:
        """Images NHWC in [-1, 1] -> normalised latents (mean - shift) * scale, NHWC float32.

        With `key`, samples the posterior instead of taking its mean.
        """
        if images.ndim != 4 or images.shape[-1] != self.params.in_channels:
            raise ValueError(f"images must be NHWC with {self.params.in_channels} channels, got {images.shape}")
        f = self.params.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {images.shape[1:3]}")
        mean, logvar = self.moments(images)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return (z - self.params.shift_factor) * self.params.scaling_factor

    def decode(self, latents: Array, batch_chunk: int | None = None) -> Array:
        """Normalised latents NHWC -> images NHWC (about [-1, 1]), float32.

        `batch_chunk` decodes that many images at a time (a `lax.map` loop,
        one compiled decoder), which bounds the activation memory of large
        batches.
        """
        if latents.ndim != 4 or latents.shape[-1] != self.params.latent_channels:
            raise ValueError(f"latents must be NHWC with {self.params.latent_channels} channels, got {latents.shape}")
        if batch_chunk is not None and latents.shape[0] > batch_chunk:
            return jax.lax.map(lambda z: self.decode(z[None])[0], jnp.asarray(latents), batch_size=batch_chunk)
        z = jnp.asarray(latents, jnp.float32) / self.params.scaling_factor + self.params.shift_factor
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: Array) -> Array:
        return self.decode(self.encode(images))


def abstract(params: AutoEncoderParams, *, param_dtype: DTypeLike = jnp.float32,
             dtype: DTypeLike | None = None) -> AutoEncoder:
    """The model's structure, shapes and dtypes, with no memory allocated."""
    return nnx.eval_shape(lambda: AutoEncoder(params, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))


def load(path: str, dtype: DTypeLike | None = None, *, compute_dtype: DTypeLike | None = None,
         shardings: Shardings | None = None) -> AutoEncoder:
    """Loads a converted autoencoder folder (`scripts/convert_flux.py --components vae`).

    `dtype` is the parameter dtype (default: as stored); `compute_dtype`
    defaults to the parameter dtype.
    """
    build = lambda cfg, pd: abstract(AutoEncoderParams.from_dict(cfg), param_dtype=pd, dtype=compute_dtype)
    return store.load_model(path, "autoencoder", build, dtype, shardings=shardings)
