"""Building blocks of the Flux MMDiT in Flax NNX, named as in BFL's reference.

Layout conventions: activations are [batch, tokens, features]; attention
heads are [batch, tokens, heads, head_dim] (the layout of
`jax.nn.dot_product_attention`). Timestep sinusoids, RoPE and the q/k
RMSNorm run in float32 whatever the compute dtype; LayerNorms normalise in
float32 and return the compute dtype.

Per-token modulation (OminiControl-style conditioning): a block can receive a
second conditioning vector `vec_cond` and a boolean token mask; masked tokens
(the clean condition image) are modulated with `vec_cond` (the embedding of
timestep 0) while the others use `vec`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Array:
    """Sinusoidal embedding of `t * time_factor`, [cos | sin], float32."""
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rope(pos: Array, dim: int, theta: float) -> Array:
    """Rotation matrices for one position axis: [..., n, dim/2, 2, 2], float32."""
    scale = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.astype(jnp.float32)[..., None] * omega
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.stack([cos, -sin, sin, cos], axis=-1).reshape(*angles.shape, 2, 2)


def embed_nd(ids: Array, axes_dim: Sequence[int], theta: float) -> Array:
    """RoPE for multi-axis position ids [B, L, n_axes] -> [B, L, head_dim/2, 2, 2]."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dim)}")
    return jnp.concatenate([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-3)


def apply_rope(x: Array, pe: Array) -> Array:
    """Rotates interleaved pairs of x [B, L, H, D] by pe [B, L, D/2, 2, 2] in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 1, 2)
    pe = pe[:, :, None]  # broadcast over heads
    out = pe[..., 0] * xf[..., 0] + pe[..., 1] * xf[..., 1]
    return out.reshape(x.shape).astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attention(q: Array, k: Array, v: Array, pe: Array, *, implementation: str | None = "xla") -> Array:
    """Self-attention with RoPE. q, k, v: [B, L, H, D] -> [B, L, H*D].

    The single place where attention is computed; `implementation` selects
    the kernel ("xla" everywhere; "cudnn" flash attention on NVIDIA GPUs).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS + (None,):
        raise ValueError(f"attention implementation {implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}")
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(*out.shape[:2], -1)


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine parameters, normalised in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Parameter dtype and compute dtype, set separately."""

    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32


def linear(din: int, dout: int, prec: Precision, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=prec.dtype, param_dtype=prec.param_dtype, rngs=rngs)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden_dim: int, prec: Precision, rngs: nnx.Rngs):
        self.in_layer = linear(in_dim, hidden_dim, prec, rngs)
        self.out_layer = linear(hidden_dim, hidden_dim, prec, rngs)

    def __call__(self, x: Array) -> Array:
        return self.out_layer(nnx.silu(self.in_layer(x)))


class RMSNorm(nnx.Module):
    """RMSNorm with a learned `scale`, computed in float32 (eps 1e-6)."""

    def __init__(self, dim: int, prec: Precision):
        self.scale = nnx.Param(jnp.ones((dim,), prec.param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + 1e-6)
        return xf * rrms * self.scale[...].astype(jnp.float32)


class QKNorm(nnx.Module):
    def __init__(self, dim: int, prec: Precision):
        self.query_norm = RMSNorm(dim, prec)
        self.key_norm = RMSNorm(dim, prec)

    def __call__(self, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class SelfAttention(nnx.Module):
    """Holds the attention projections of one stream (`qkv` fused, `proj`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, prec: Precision, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = linear(dim, dim * 3, prec, rngs, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads, prec)
        self.proj = linear(dim, dim, prec, rngs)

    def qkv_heads(self, x: Array) -> tuple[Array, Array, Array]:
        return split_qkv(self.qkv(x), self.num_heads, self.norm)


def split_qkv(qkv: Array, num_heads: int, norm: QKNorm) -> tuple[Array, Array, Array]:
    """[B, L, 3*H*D] -> normalised q, k and v, each [B, L, H, D]."""
    b, n, _ = qkv.shape
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, num_heads, -1), 2, 0)
    q, k = norm(q, k, v)
    return q, k, v


class ModulationOut(NamedTuple):
    shift: Array
    scale: Array
    gate: Array

    def select(self, other: "ModulationOut | None", mask: Array | None) -> "ModulationOut":
        """Per token: `other` where mask [B or 1, L, 1] is True, else self."""
        if other is None:
            return self
        return ModulationOut(*(jnp.where(mask, o, s) for s, o in zip(self, other)))


class Modulation(nnx.Module):
    def __init__(self, dim: int, double: bool, prec: Precision, rngs: nnx.Rngs):
        self.multiplier = 6 if double else 3
        self.lin = linear(dim, self.multiplier * dim, prec, rngs)

    def __call__(self, vec: Array) -> list[ModulationOut]:
        out = jnp.split(self.lin(nnx.silu(vec))[:, None, :], self.multiplier, axis=-1)
        return [ModulationOut(*out[i : i + 3]) for i in range(0, self.multiplier, 3)]


def modulations(mod: Modulation, vec: Array, vec_cond: Array | None, mask: Array | None) -> list[ModulationOut]:
    """Modulation for every token; masked tokens take `vec_cond`'s."""
    base = mod(vec)
    if vec_cond is None:
        return base
    return [b.select(c, mask) for b, c in zip(base, mod(vec_cond))]


def modulate(x: Array, m: ModulationOut) -> Array:
    return (1 + m.scale) * layer_norm(x) + m.shift


def mlp_layers(dim: int, hidden: int, prec: Precision, rngs: nnx.Rngs) -> nnx.List:
    """BFL's Sequential(Linear, GELU, Linear): entries 0 and 2 hold the weights."""
    return nnx.List([linear(dim, hidden, prec, rngs), None, linear(hidden, dim, prec, rngs)])


def mlp(layers: nnx.List, x: Array) -> Array:
    return layers[2](jax.nn.gelu(layers[0](x), approximate=True))


class DoubleStreamBlock(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, prec: Precision,
                 rngs: nnx.Rngs, attention_impl: str = "xla"):
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.img_mod = Modulation(hidden_size, True, prec, rngs)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, prec, rngs)
        self.img_mlp = mlp_layers(hidden_size, mlp_hidden, prec, rngs)
        self.txt_mod = Modulation(hidden_size, True, prec, rngs)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, prec, rngs)
        self.txt_mlp = mlp_layers(hidden_size, mlp_hidden, prec, rngs)

    def __call__(self, img: Array, txt: Array, vec: Array, pe: Array, vec_cond: Array | None = None,
                 img_cond_mask: Array | None = None) -> tuple[Array, Array]:
        img_mod1, img_mod2 = modulations(self.img_mod, vec, vec_cond, img_cond_mask)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_mod1))
        q = jnp.concatenate([txt_q, img_q], axis=1)
        k = jnp.concatenate([txt_k, img_k], axis=1)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        attn = attention(q, k, v, pe, implementation=self.attention_impl)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * mlp(self.img_mlp, modulate(img, img_mod2))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * mlp(self.txt_mlp, modulate(txt, txt_mod2))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP block (`linear1` fused qkv+mlp-in, `linear2` fused out)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, prec: Precision, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = linear(hidden_size, hidden_size * 3 + self.mlp_hidden, prec, rngs)
        self.linear2 = linear(hidden_size + self.mlp_hidden, hidden_size, prec, rngs)
        self.norm = QKNorm(hidden_size // num_heads, prec)
        self.modulation = Modulation(hidden_size, False, prec, rngs)

    def __call__(self, x: Array, vec: Array, pe: Array, vec_cond: Array | None = None,
                 cond_mask: Array | None = None) -> Array:
        (mod,) = modulations(self.modulation, vec, vec_cond, cond_mask)
        h = self.linear1(modulate(x, mod))
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        q, k, v = split_qkv(qkv, self.num_heads, self.norm)
        attn = attention(q, k, v, pe, implementation=self.attention_impl)
        out = self.linear2(jnp.concatenate([attn, jax.nn.gelu(mlp, approximate=True)], axis=-1))
        return x + mod.gate * out


class LastLayer(nnx.Module):
    def __init__(self, hidden_size: int, out_channels: int, prec: Precision, rngs: nnx.Rngs):
        self.linear = linear(hidden_size, out_channels, prec, rngs)
        # BFL's `adaLN_modulation` is Sequential(SiLU, Linear): the Linear is entry 1.
        self.adaLN_modulation = nnx.List([None, linear(hidden_size, 2 * hidden_size, prec, rngs)])

    def _shift_scale(self, vec: Array) -> tuple[Array, Array]:
        shift, scale = jnp.split(self.adaLN_modulation[1](nnx.silu(vec)), 2, axis=-1)
        return shift[:, None], scale[:, None]

    def __call__(self, x: Array, vec: Array, vec_cond: Array | None = None, cond_mask: Array | None = None) -> Array:
        shift, scale = self._shift_scale(vec)
        if vec_cond is not None:
            shift_c, scale_c = self._shift_scale(vec_cond)
            shift, scale = jnp.where(cond_mask, shift_c, shift), jnp.where(cond_mask, scale_c, scale)
        return self.linear((1 + scale) * layer_norm(x) + shift)
