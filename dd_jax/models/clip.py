"""The CLIP text transformer (Flux's CLIP-L text encoder) in Flax NNX.

Module names are those of transformers' `CLIPTextModel` without the
`text_model.` prefix older checkpoints carry (`embeddings.token_embedding`,
`encoder.layers.N.self_attn.{q,k,v,out}_proj`, `layer_norm1/2`,
`mlp.fc1/fc2`, `final_layer_norm`); `weights_conversion/clip.py` accepts
both.

    clip = clip.load(path)
    hidden, pooled = clip(input_ids)   # [B, L, D], [B, D]: final-norm states and the EOS token's

Pre-norm blocks with causal self-attention and quick-GELU. The pooled
output is the final-norm state at the end-of-text token: the position of
the largest token id for checkpoints whose config says `eos_token_id` 2
(OpenAI's original convention, the one Flux's CLIP-L uses), else the first
position holding `eos_token_id`. LayerNorms run in float32.
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

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields that matter to the text model."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


PRESETS = {
    "clip-vit-large-patch14": CLIPTextConfig(),
    "tiny": CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16),
}


class LayerNorm(nnx.Module):
    """LayerNorm with `scale` and `bias`, in float32; returns the compute dtype."""

    def __init__(self, dim: int, eps: float, prec: Precision):
        self.eps, self.dtype = eps, prec.dtype
        self.scale = nnx.Param(jnp.ones((dim,), prec.param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), prec.param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, prec: Precision, rngs: nnx.Rngs):
        embed = lambda n: nnx.Embed(n, cfg.hidden_size, dtype=prec.dtype, param_dtype=prec.param_dtype, rngs=rngs)
        self.token_embedding = embed(cfg.vocab_size)
        self.position_embedding = embed(cfg.max_position_embeddings)

    def __call__(self, input_ids: Array) -> Array:
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[-1]))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, prec: Precision, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = layers.linear(d, d, prec, rngs)
        self.k_proj = layers.linear(d, d, prec, rngs)
        self.v_proj = layers.linear(d, d, prec, rngs)
        self.out_proj = layers.linear(d, d, prec, rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits * (d // self.num_heads) ** -0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, prec: Precision, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, prec, rngs)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, prec, rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, prec: Precision, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, prec, rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, prec)
        self.mlp = CLIPMLP(cfg, prec, rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, prec)

    def __call__(self, x: Array, mask: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, prec: Precision, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, prec, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: Array, mask: Array) -> Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextModel(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 dtype: DTypeLike | None = None):
        self.config = cfg
        prec = Precision(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype or param_dtype))
        self.dtype = prec.dtype
        self.embeddings = CLIPTextEmbeddings(cfg, prec, rngs)
        self.encoder = CLIPEncoder(cfg, prec, rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, prec)

    def eos_positions(self, input_ids: Array) -> Array:
        if self.config.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array]:
        """input_ids [B, L] (L <= max_position_embeddings) -> (last_hidden_state [B, L, D], pooled [B, D]).

        `attention_mask` [B, L] (1 = attend) masks padding keys on top of the causal mask.
        """
        input_ids = jnp.asarray(input_ids)
        n = input_ids.shape[-1]
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens; this CLIP takes at most {self.config.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        x = self.encoder(self.embeddings(input_ids), mask)
        hidden = self.final_layer_norm(x)
        pooled = jnp.take_along_axis(hidden, self.eos_positions(input_ids)[:, None, None], axis=1)[:, 0]
        return hidden, pooled


def abstract(cfg: CLIPTextConfig, *, param_dtype: DTypeLike = jnp.float32,
             dtype: DTypeLike | None = None) -> CLIPTextModel:
    """The model's structure, shapes and dtypes, with no memory allocated."""
    return nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))


def load(path: str, dtype: DTypeLike | None = None, *, compute_dtype: DTypeLike | None = None,
         shardings: Shardings | None = None) -> CLIPTextModel:
    """Loads a converted CLIP text encoder folder (`scripts/convert_flux.py --components clip`).

    `dtype` is the parameter dtype (default: as stored); `compute_dtype`
    defaults to the parameter dtype.
    """
    build = lambda cfg, pd: abstract(CLIPTextConfig.from_dict(cfg), param_dtype=pd, dtype=compute_dtype)
    return store.load_model(path, "clip", build, dtype, shardings=shardings)
