"""The T5 v1.1 encoder (Flux's T5-XXL text encoder) in Flax NNX.

Module names are those of transformers' `T5EncoderModel`
(`shared`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`,
`encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `layer_norm`,
`encoder.final_layer_norm`), so its checkpoints map 1:1
(`weights_conversion/t5.py`).

    t5 = t5.load(path)
    hidden = t5(input_ids, attention_mask=None)   # [B, L, d_model], the last hidden state

T5 specifics: pre-norm residual blocks with RMSNorm (no mean, no bias),
computed in float32; attention without 1/sqrt(d) scaling, plus a learned
bias per (relative position bucket, head) that block 0 holds and every
block shares; gated-GELU feed-forward (`gelu_new`, the tanh approximation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from dd_jax.models import layers, store
from dd_jax.models.layers import Precision

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from dd_jax.models.store import Convert, Shardings

Array = jax.Array

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers' T5Config fields that matter to the encoder."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"

    def __post_init__(self):
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"activation {self.dense_act_fn!r}; supported: {sorted(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


PRESETS = {
    "t5-v1_1-xxl": T5Config(),
    "tiny": T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
}


def relative_position_bucket(relative_position: Array, num_buckets: int = 32, max_distance: int = 128) -> Array:
    """Bidirectional T5 buckets: exact for small |distance|, log-spaced up to `max_distance`."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log as in the reference; the maximum keeps log() away from 0 where is_small anyway
    large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class T5LayerNorm(nnx.Module):
    """RMSNorm without mean subtraction or bias, in float32; returns the compute dtype."""

    def __init__(self, dim: int, eps: float, prec: Precision):
        self.eps, self.dtype = eps, prec.dtype
        self.scale = nnx.Param(jnp.ones((dim,), prec.param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, prec: Precision, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = layers.linear(cfg.d_model, inner, prec, rngs, bias=False)
        self.k = layers.linear(cfg.d_model, inner, prec, rngs, bias=False)
        self.v = layers.linear(cfg.d_model, inner, prec, rngs, bias=False)
        self.o = layers.linear(inner, cfg.d_model, prec, rngs, bias=False)
        self.relative_attention_bias = (
            nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                      param_dtype=prec.param_dtype, rngs=rngs) if has_relative_bias else None)

    def position_bias(self, q_len: int, k_len: int) -> Array:
        """[1, heads, q_len, k_len] float32."""
        rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]  # memory - query position
        buckets = relative_position_bucket(rel, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x: Array, bias: Array) -> Array:
        """`bias` [B or 1, heads, L, L] float32 holds the position bias and the padding mask."""
        b, n, _ = x.shape
        heads = lambda t: t.reshape(b, n, self.cfg.num_heads, self.cfg.d_kv)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.o(out.reshape(b, n, -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, prec: Precision, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_bias, prec, rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, prec)

    def __call__(self, x: Array, bias: Array) -> Array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, prec: Precision, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        self.wi_0 = layers.linear(cfg.d_model, cfg.d_ff, prec, rngs, bias=False)
        self.wi_1 = layers.linear(cfg.d_model, cfg.d_ff, prec, rngs, bias=False)
        self.wo = layers.linear(cfg.d_ff, cfg.d_model, prec, rngs, bias=False)

    def __call__(self, x: Array) -> Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, prec: Precision, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseGatedActDense(cfg, prec, rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, prec)

    def __call__(self, x: Array) -> Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, prec: Precision, rngs: nnx.Rngs):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_relative_bias, prec, rngs), T5LayerFF(cfg, prec, rngs)])

    def __call__(self, x: Array, bias: Array) -> Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, prec: Precision, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(cfg, i == 0, prec, rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, prec)

    def __call__(self, x: Array, attention_mask: Array | None) -> Array:
        n = x.shape[1]
        bias = self.block[0].layer[0].SelfAttention.position_bias(n, n)
        if attention_mask is not None:  # [B, L], 1 = attend; masked keys get the float32 minimum
            keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
            bias = jnp.where(keep, bias, jnp.finfo(jnp.float32).min)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 dtype: DTypeLike | None = None):
        self.config = cfg
        prec = Precision(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype or param_dtype))
        self.dtype = prec.dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=prec.dtype, param_dtype=prec.param_dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, prec, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids [B, L] -> last hidden state [B, L, d_model] in the compute dtype."""
        return self.encoder(self.shared(jnp.asarray(input_ids)), attention_mask)


def abstract(cfg: T5Config, *, param_dtype: DTypeLike = jnp.float32, dtype: DTypeLike | None = None) -> T5Encoder:
    """The model's structure, shapes and dtypes, with no memory allocated."""
    return nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))


def load(path: str, dtype: DTypeLike | None = None, *, compute_dtype: DTypeLike | None = None,
         shardings: Shardings | None = None, convert: Convert | None = None) -> T5Encoder:
    """Loads a converted T5 encoder folder (`scripts/convert_flux.py --components t5`).

    `dtype` is the parameter dtype (default: as stored); `compute_dtype`
    defaults to the parameter dtype. `convert` (see `store.load_module`) may place
    arrays itself as they are read: `dd_jax.quantize.load_t5` stores the blocks'
    Linears quantized that way.
    """
    build = lambda cfg, pd: abstract(T5Config.from_dict(cfg), param_dtype=pd, dtype=compute_dtype)
    return store.load_model(path, "t5", build, dtype, shardings=shardings, convert=convert)
