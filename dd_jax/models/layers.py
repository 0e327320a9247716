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

Sharding is data: every parameter carries logical axis names in its
`logical_axes` metadata (e.g. a double block's `img_mlp.0.kernel` is
("embed", "mlp")); `dd_jax.sharding` maps the names to mesh axes. (Not flax's
`out_sharding`: flax reads that as mesh axis names whenever a mesh is set,
e.g. in `nnx.eval_shape` under `jax.set_mesh`, and the rules come from the
config only later.) Activations are
constrained at block boundaries and on q/k/v through an optional
`activation_sharding` object (anything with `constrain(x, names)`, set by
`dd_jax.sharding.shard_model`; None = no constraints). `checkpoint_name`
tags ("proj" on every projection output, "qkv", "attn_out", "mlp_hidden") let the remat policies of
`dd_jax.models.flux` save or offload exactly those activations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from dd_jax.sharding import ActivationSharding

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


def apply_rope(x: Array, pe: Array, dtype: DTypeLike | None = None) -> Array:
    """Rotates interleaved pairs of x [B, L, H, D] by pe [B, L, D/2, 2, 2] in float32; the result in `dtype`
    (default x's).

    Written with the cos/sin planes (pe = [[cos, -sin], [sin, cos]]) rather than as a product with
    the 2x2 matrices: the same numbers, but no size-2 reductions in the backward pass.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = pe[:, :, None, :, 0, 0], pe[:, :, None, :, 1, 0]  # broadcast over heads
    out = jnp.stack([cos * x0 + pe[:, :, None, :, 0, 1] * x1, sin * x0 + pe[:, :, None, :, 1, 1] * x1], axis=-1)
    return out.reshape(x.shape).astype(dtype or x.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
# Platforms code can be traced for (jax's lowering platform names; "gpu" is what jax.default_backend()
# says on an NVIDIA GPU and means "cuda" here).
PLATFORMS = ("cpu", "cuda", "gpu", "rocm", "tpu")


def platform_or_default(platform: str | None) -> str:
    """The platform code is traced for: `platform` when given (checked), else the current backend.

    Model code never asks JAX for the backend at trace time; the model holds this value (chosen once,
    at construction), so a step can be lowered on this machine for another platform."""
    if not platform:
        return jax.default_backend()
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}; choose from {PLATFORMS}")
    return platform
ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")


def constrain(x: Array, names: tuple, sharding: ActivationSharding | None = None) -> Array:
    """Sharding constraint by logical names; a no-op without an activation-sharding object."""
    return x if sharding is None else sharding.constrain(x, names)


def resolve_attention(implementation: str | None, dtype: DTypeLike | None = None, platform: str | None = None) -> str:
    """The kernel an implementation name means on this platform ("auto": cuDNN on NVIDIA with
    16-bit inputs, splash on TPU, XLA otherwise); a clear error where the kernel cannot run."""
    impl = implementation or "xla"
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}")
    platform = platform_or_default(platform)
    half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        return "cudnn" if platform in ("gpu", "cuda") and half else "splash" if platform == "tpu" else "xla"
    if impl == "cudnn":
        if platform not in ("gpu", "cuda"):
            raise ValueError(f"attention 'cudnn' needs an NVIDIA GPU; this backend is {platform!r} (use 'xla')")
        if dtype is not None and not half:
            raise ValueError(f"attention 'cudnn' needs bfloat16/float16 activations, got {jnp.dtype(dtype).name}")
    return impl


def _splash_attention(q: Array, k: Array, v: Array, sharding=None, platform: str = "tpu") -> Array:
    """Pallas splash attention (Mosaic kernels for `platform` "tpu"; interpret mode elsewhere).
    [B, L, H, D] -> [B, L, H, D].

    The length is padded to the block size; padded tokens form their own
    segment, so real tokens never attend to them. Under a mesh the kernel runs
    per shard (batch and heads sharded as the activation rules say).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, n, h, d = q.shape
    block = 512 if n >= 1024 else 128
    padded = -(-n // block) * block
    interpret = platform != "tpu"
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    seg = jnp.zeros((padded,), jnp.int32).at[n:].set(1)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q, k, v = pad(q), pad(k), pad(v)

    spec = sharding.spec(ACT_HEADS, (b, padded, h, d)) if sharding is not None else None
    heads_shards = 1
    if spec is not None:
        heads_axes = spec[2] if len(spec) > 2 else None
        for a in (heads_axes if isinstance(heads_axes, tuple) else (heads_axes,) if heads_axes else ()):
            heads_shards *= sharding.mesh.shape[a]
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.FullMask((padded, padded))] * (h // heads_shards)),
                                head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)

    def run(q, k, v):
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=sa.SegmentIds(q=seg, kv=seg)))(q, k, v)

    if spec is not None:  # [B, H, L, D] inside: batch and heads sharded, length whole
        p = jax.sharding.PartitionSpec(spec[0], spec[2], None, None)
        run = jax.shard_map(run, mesh=sharding.mesh, in_specs=(p, p, p), out_specs=p, check_vma=False)
    return run(q, k, v).transpose(0, 2, 1, 3)[:, :n]


@jax.custom_vjp
def xla_attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax attention in plain XLA ops, [B, L, H, D] -> [B, L, H, D], softmax in float32.

    A hand-written backward (FlashAttention's: the softmax gradient uses rowsum(dO * O) instead
    of a reduction over the [L, L] probabilities; heads-major layouts so every matmul is a plain
    batched GEMM) runs about twice as fast as autodiff of the same forward on XLA:CPU.
    """
    return _xla_attention_fwd(q, k, v)[0]


def _xla_attention_fwd(q, k, v):
    scale = q.shape[-1] ** -0.5
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt).astype(jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("bhqk,bhkd->bhqd", p, vt)
    return jnp.swapaxes(o, 1, 2), (qt, kt, vt, p, o)


def _xla_attention_bwd(res, g):
    qt, kt, vt, p, o = res
    scale = qt.shape[-1] ** -0.5
    gt = jnp.swapaxes(g, 1, 2)
    dv = jnp.einsum("bhqk,bhqd->bhkd", p, gt)
    dp = jnp.einsum("bhqd,bhkd->bhqk", gt, vt).astype(jnp.float32)
    delta = jnp.sum(gt.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p.astype(jnp.float32) * (dp - delta) * scale).astype(qt.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kt)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qt)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def attention(q: Array, k: Array, v: Array, pe: Array | None, *, implementation: str | None = "xla",
              sharding: ActivationSharding | None = None, platform: str | None = None) -> Array:
    """Self-attention with RoPE. q, k, v: [B, L, H, D] -> [B, L, H*D].

    The single place where attention is computed; `implementation` selects
    the kernel: "xla" (everywhere), "cudnn" (flash attention on NVIDIA GPUs,
    16-bit inputs), "splash" (Pallas splash attention on TPU; interpret mode
    on other backends, for tests), "auto" (see `resolve_attention`). `platform` is the
    platform the code is traced for (None: the current backend; a model passes its own).
    `pe` None: q and k are rotated already (`QKNorm` with `pe`, the blocks' default).
    """
    platform = platform_or_default(platform)
    impl = resolve_attention(implementation, v.dtype, platform)
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    q, k, v = (constrain(x, ACT_HEADS, sharding) for x in (q, k, v))
    q, k, v = checkpoint_name(q, "qkv"), checkpoint_name(k, "qkv"), checkpoint_name(v, "qkv")
    if impl == "splash":
        out = _splash_attention(q, k, v, sharding, platform)
    elif impl == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    else:
        out = xla_attention(q, k, v)
    out = checkpoint_name(constrain(out, ACT_HEADS, sharding), "attn_out")
    return out.reshape(*out.shape[:2], -1)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """GELU, tanh approximation (= jax.nn.gelu(x, approximate=True)).

    Its gradient is recomputed from x alone: autodiff of the tanh formula keeps five
    intermediates of x's size per call for the backward pass.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf**3))
    d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


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


LOGICAL_AXES = "logical_axes"  # the Variable metadata key of logical axis names


def axes_metadata(names: tuple) -> dict:
    """Variable metadata holding logical axis names."""
    return {LOGICAL_AXES: tuple(names)}


def linear(din: int, dout: int, prec: Precision, rngs: nnx.Rngs, bias: bool = True,
           axes: tuple = (None, None)) -> nnx.Linear:
    """nnx.Linear whose kernel has logical axes `axes` = (in, out) and bias (out,)."""
    return nnx.Linear(din, dout, use_bias=bias, dtype=prec.dtype, param_dtype=prec.param_dtype, rngs=rngs,
                      kernel_metadata=axes_metadata(axes), bias_metadata=axes_metadata(axes[1:]))


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden_dim: int, prec: Precision, rngs: nnx.Rngs):
        self.in_layer = linear(in_dim, hidden_dim, prec, rngs, axes=("input", "mlp"))
        self.out_layer = linear(hidden_dim, hidden_dim, prec, rngs, axes=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.out_layer(nnx.silu(self.in_layer(x)))


class RMSNorm(nnx.Module):
    """RMSNorm with a learned `scale`, computed in float32 (eps 1e-6)."""

    def __init__(self, dim: int, prec: Precision):
        self.scale = nnx.Param(jnp.ones((dim,), prec.param_dtype), **axes_metadata(("norm",)))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + 1e-6)
        return xf * rrms * self.scale[...].astype(jnp.float32)


class QKNorm(nnx.Module):
    def __init__(self, dim: int, prec: Precision):
        self.query_norm = RMSNorm(dim, prec)
        self.key_norm = RMSNorm(dim, prec)

    def __call__(self, q: Array, k: Array, v: Array, pe: Array | None = None) -> tuple[Array, Array]:
        """The normalised q and k in v's dtype; with `pe`, also rotated (RoPE) while still in float32: one
        elementwise pass and one rounding instead of a rounding, a concatenation and a second float32 pass."""
        q, k = self.query_norm(q), self.key_norm(k)
        if pe is None:
            return q.astype(v.dtype), k.astype(v.dtype)
        return apply_rope(q, pe, v.dtype), apply_rope(k, pe, v.dtype)


class SelfAttention(nnx.Module):
    """Holds the attention projections of one stream (`qkv` fused, `proj`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, prec: Precision, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = linear(dim, dim * 3, prec, rngs, bias=qkv_bias, axes=("embed", "qkv"))
        self.norm = QKNorm(dim // num_heads, prec)
        self.proj = linear(dim, dim, prec, rngs, axes=("heads", "embed"))

    def qkv_heads(self, x: Array, pe: Array | None = None) -> tuple[Array, Array, Array]:
        return split_qkv(checkpoint_name(self.qkv(x), "proj"), self.num_heads, self.norm, pe)


def split_qkv(qkv: Array, num_heads: int, norm: QKNorm, pe: Array | None = None) -> tuple[Array, Array, Array]:
    """[B, L, 3*H*D] -> normalised (with `pe`: and rotated) q, k and v, each [B, L, H, D]."""
    b, n, _ = qkv.shape
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, num_heads, -1), 2, 0)
    q, k = norm(q, k, v, pe)
    return q, k, v


class ModulationOut(NamedTuple):
    shift: Array
    scale: Array
    gate: Array

    def select(self, other: ModulationOut | None, mask: Array | None) -> ModulationOut:
        """Per token: `other` where mask [B or 1, L, 1] is True, else self."""
        if other is None:
            return self
        return ModulationOut(*(jnp.where(mask, o, s) for s, o in zip(self, other)))


class Modulation(nnx.Module):
    def __init__(self, dim: int, double: bool, prec: Precision, rngs: nnx.Rngs):
        self.multiplier = 6 if double else 3
        self.lin = linear(dim, self.multiplier * dim, prec, rngs, axes=("embed", "mod"))

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
    return nnx.List([linear(dim, hidden, prec, rngs, axes=("embed", "mlp")), None,
                     linear(hidden, dim, prec, rngs, axes=("mlp", "embed"))])


def mlp(layers: nnx.List, x: Array) -> Array:
    hidden = checkpoint_name(checkpoint_name(layers[0](x), "proj"), "mlp_hidden")
    return checkpoint_name(layers[2](gelu(hidden)), "proj")


class DoubleStreamBlock(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, prec: Precision,
                 rngs: nnx.Rngs, attention_impl: str = "xla", platform: str | None = None, rope_in_norm: bool = True):
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.rope_in_norm = bool(rope_in_norm)  # RoPE inside the q/k norm's float32 pass (QKNorm), per stream
        self.platform = platform_or_default(platform)
        self.activation_sharding = None  # set by dd_jax.sharding.shard_model
        self.img_mod = Modulation(hidden_size, True, prec, rngs)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, prec, rngs)
        self.img_mlp = mlp_layers(hidden_size, mlp_hidden, prec, rngs)
        self.txt_mod = Modulation(hidden_size, True, prec, rngs)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, prec, rngs)
        self.txt_mlp = mlp_layers(hidden_size, mlp_hidden, prec, rngs)

    def __call__(self, img: Array, txt: Array, vec: Array, pe: Array, vec_cond: Array | None = None,
                 img_cond_mask: Array | None = None) -> tuple[Array, Array]:
        sh = self.activation_sharding
        img, txt = constrain(img, ACT_EMBED, sh), constrain(txt, ACT_EMBED, sh)
        img_mod1, img_mod2 = modulations(self.img_mod, vec, vec_cond, img_cond_mask)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        n_txt = txt.shape[1]
        pe_txt, pe_img, pe_joint = (pe[:, :n_txt], pe[:, n_txt:], None) if self.rope_in_norm else (None, None, pe)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_mod1), pe_img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_mod1), pe_txt)
        q = jnp.concatenate([txt_q, img_q], axis=1)
        k = jnp.concatenate([txt_k, img_k], axis=1)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        attn = attention(q, k, v, pe_joint, implementation=self.attention_impl, sharding=sh, platform=self.platform)
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
        img = img + img_mod1.gate * checkpoint_name(self.img_attn.proj(img_attn), "proj")
        img = img + img_mod2.gate * mlp(self.img_mlp, modulate(img, img_mod2))
        txt = txt + txt_mod1.gate * checkpoint_name(self.txt_attn.proj(txt_attn), "proj")
        txt = txt + txt_mod2.gate * mlp(self.txt_mlp, modulate(txt, txt_mod2))
        return constrain(img, ACT_EMBED, sh), constrain(txt, ACT_EMBED, sh)


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP block (`linear1` fused qkv+mlp-in, `linear2` fused out)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, prec: Precision, rngs: nnx.Rngs,
                 attention_impl: str = "xla", platform: str | None = None, rope_in_norm: bool = True):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.rope_in_norm = bool(rope_in_norm)  # RoPE inside the q/k norm's float32 pass (QKNorm)
        self.platform = platform_or_default(platform)
        self.activation_sharding = None  # set by dd_jax.sharding.shard_model
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = linear(hidden_size, hidden_size * 3 + self.mlp_hidden, prec, rngs, axes=("embed", "single_in"))
        self.linear2 = linear(hidden_size + self.mlp_hidden, hidden_size, prec, rngs, axes=("single_out", "embed"))
        self.norm = QKNorm(hidden_size // num_heads, prec)
        self.modulation = Modulation(hidden_size, False, prec, rngs)

    def __call__(self, x: Array, vec: Array, pe: Array, vec_cond: Array | None = None,
                 cond_mask: Array | None = None) -> Array:
        sh = self.activation_sharding
        x = constrain(x, ACT_EMBED, sh)
        (mod,) = modulations(self.modulation, vec, vec_cond, cond_mask)
        h = checkpoint_name(self.linear1(modulate(x, mod)), "proj")
        qkv, mlp = jnp.split(h, [3 * self.hidden_size], axis=-1)  # (its transpose is one concatenate)
        q, k, v = split_qkv(qkv, self.num_heads, self.norm, pe if self.rope_in_norm else None)
        attn = attention(q, k, v, None if self.rope_in_norm else pe, implementation=self.attention_impl,
                         sharding=sh, platform=self.platform)
        mlp = checkpoint_name(mlp, "mlp_hidden")
        out = checkpoint_name(self.linear2(jnp.concatenate([attn, gelu(mlp)], axis=-1)),
                              "proj")
        return constrain(x + mod.gate * out, ACT_EMBED, sh)


class LastLayer(nnx.Module):
    def __init__(self, hidden_size: int, out_channels: int, prec: Precision, rngs: nnx.Rngs):
        self.linear = linear(hidden_size, out_channels, prec, rngs, axes=("embed", "output"))
        # BFL's `adaLN_modulation` is Sequential(SiLU, Linear): the Linear is entry 1.
        self.adaLN_modulation = nnx.List([None, linear(hidden_size, 2 * hidden_size, prec, rngs,
                                                       axes=("embed", "mod"))])

    def _shift_scale(self, vec: Array) -> tuple[Array, Array]:
        shift, scale = jnp.split(self.adaLN_modulation[1](nnx.silu(vec)), 2, axis=-1)
        return shift[:, None], scale[:, None]

    def __call__(self, x: Array, vec: Array, vec_cond: Array | None = None, cond_mask: Array | None = None) -> Array:
        shift, scale = self._shift_scale(vec)
        if vec_cond is not None:
            shift_c, scale_c = self._shift_scale(vec_cond)
            shift, scale = jnp.where(cond_mask, shift_c, shift), jnp.where(cond_mask, scale_c, scale)
        return self.linear((1 + scale) * layer_norm(x) + shift)
