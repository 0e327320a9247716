"""The Flux MMDiT (FLUX.1 dev/schnell/Kontext architecture) in Flax NNX.

Module names follow BFL's reference (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `final_layer.adaLN_modulation.1`), so a BFL
checkpoint maps 1:1 and a diffusers checkpoint through one table
(`weights_conversion/flux.py`). The forward is BFL's:

    model(img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> [B, L_img, out_channels]

with `img` already packed 2x2 into tokens. The extra keyword `cond_mask`
([L_img] or [B, L_img] bool) modulates the masked image tokens (a clean
condition image) as timestep 0, OminiControl-style.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dd_jax.models import layers, store
from dd_jax.models.layers import Precision

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FluxParams:
    """BFL's FluxParams fields."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.hidden_size // self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FluxParams":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


PRESETS: dict[str, FluxParams] = {
    "flux-dev": FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                           mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56),
                           theta=10_000, qkv_bias=True, guidance_embed=True),
    "flux-schnell": FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                               hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                               axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True, guidance_embed=False),
    "tiny": FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                       mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                       theta=10_000, qkv_bias=True, guidance_embed=True),
}
PRESETS["flux-kontext-dev"] = PRESETS["flux-dev"]  # same architecture; conditions via ids (1, row, col)


class Flux(nnx.Module):
    def __init__(self, params: FluxParams, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 attention_impl: str = "xla"):
        self.params = params
        prec = Precision(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype or param_dtype))
        self.dtype = prec.dtype
        h = params.hidden_size
        self.img_in = layers.linear(params.in_channels, h, prec, rngs)
        self.time_in = layers.MLPEmbedder(256, h, prec, rngs)
        self.vector_in = layers.MLPEmbedder(params.vec_in_dim, h, prec, rngs)
        self.guidance_in = layers.MLPEmbedder(256, h, prec, rngs) if params.guidance_embed else None
        self.txt_in = layers.linear(params.context_in_dim, h, prec, rngs)
        self.double_blocks = nnx.List([
            layers.DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias, prec, rngs, attention_impl)
            for _ in range(params.depth)
        ])
        self.single_blocks = nnx.List([
            layers.SingleStreamBlock(h, params.num_heads, params.mlp_ratio, prec, rngs, attention_impl)
            for _ in range(params.depth_single_blocks)
        ])
        self.final_layer = layers.LastLayer(h, params.out_channels, prec, rngs)

    def _vec(self, timesteps: Array, y: Array, guidance: Array | None) -> Array:
        vec = self.time_in(layers.timestep_embedding(timesteps, 256).astype(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (guidance_embed=True): pass `guidance`")
            vec = vec + self.guidance_in(layers.timestep_embedding(guidance, 256).astype(self.dtype))
        return vec + self.vector_in(y.astype(self.dtype))

    def __call__(self, img: Array, img_ids: Array, txt: Array, txt_ids: Array, timesteps: Array, y: Array,
                 guidance: Array | None = None, cond_mask: Array | None = None) -> Array:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {img.shape} and {txt.shape}")
        batch = img.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))
        img = self.img_in(img.astype(self.dtype))
        txt = self.txt_in(txt.astype(self.dtype))
        vec = self._vec(timesteps, y, guidance)
        vec_cond = img_mask = seq_mask = None
        if cond_mask is not None:
            vec_cond = self._vec(jnp.zeros_like(timesteps), y, guidance)
            img_mask = jnp.broadcast_to(jnp.asarray(cond_mask, bool), img.shape[:2])[..., None]
            seq_mask = jnp.concatenate([jnp.zeros(txt.shape[:2] + (1,), bool), img_mask], axis=1)

        ids = jnp.concatenate([jnp.broadcast_to(txt_ids, (batch,) + txt_ids.shape[-2:]),
                               jnp.broadcast_to(img_ids, (batch,) + img_ids.shape[-2:])], axis=1)
        pe = layers.embed_nd(ids, self.params.axes_dim, self.params.theta)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, vec_cond, img_mask)
        n_txt = txt.shape[1]
        x = jnp.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, vec_cond, seq_mask)
        img = x[:, n_txt:]
        return self.final_layer(img, vec, vec_cond, img_mask)


def abstract(params: FluxParams, *, param_dtype=jnp.float32, dtype=None, attention_impl: str = "xla") -> Flux:
    """The model's structure, shapes and dtypes, with no memory allocated."""
    return nnx.eval_shape(lambda: Flux(params, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype,
                                       attention_impl=attention_impl))


def load(path: str, dtype=None, *, compute_dtype=None, attention_impl: str = "xla", shardings=None) -> Flux:
    """Loads a converted checkpoint (`scripts/convert_flux.py` output).

    `dtype` is the parameter dtype (default: as stored); `compute_dtype`
    defaults to the parameter dtype.
    """
    meta = store.read_meta(path)
    if meta["model"] != "flux":
        raise ValueError(f"{path} holds a {meta['model']!r} model, not a Flux transformer")
    params = FluxParams.from_dict(meta["config"])
    module = abstract(params, param_dtype=jnp.dtype(dtype or meta["dtype"]), dtype=compute_dtype,
                      attention_impl=attention_impl)
    return store.load_module(path, module, shardings=shardings)
