"""The Flux MMDiT (FLUX.1 dev/schnell/Kontext architecture) in Flax NNX.

Module names follow BFL's reference (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `final_layer.adaLN_modulation.1`), so a BFL
checkpoint maps 1:1 and a diffusers checkpoint through one table
(`weights_conversion/flux.py`). The forward is BFL's:

    model(img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> [B, L_img, out_channels]

with `img` already packed 2x2 into tokens. The extra keyword `cond_mask`
([L_img] or [B, L_img] bool) modulates the masked image tokens (a clean
condition image) as timestep 0, OminiControl-style.

Two parameter layouts, chosen at construction: the default keeps one module
per block (`double_blocks.N....`, BFL's paths); `scan_layers=True` stacks the
blocks (`double_blocks.img_attn.qkv.kernel` is [depth, in, out], logical axis
"layers") and runs them with `nnx.scan`, so the step compiles one block
instead of 57. `load` fills either layout from the same converted checkpoint
(`stacked_sources` says which stored per-block arrays make a stacked one).
`remat` names a rematerialisation policy (`REMAT_POLICIES`) applied per block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax.models import layers, store
from dd_jax.models.layers import Precision

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from dd_jax.models.store import Convert, Shardings

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
    def from_dict(cls, d: dict[str, Any]) -> FluxParams:
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


_OFFLOADED = ("qkv", "attn_out", "mlp_hidden")
# the cuDNN flash-attention forward (jax.nn.dot_product_attention, implementation="cudnn"): its outputs (the
# attention output and the softmax statistics) are what its backward kernel needs
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _save_proj_and_attention():
    """Every projection's output ("proj") and the cuDNN attention forward's outputs: the backward pass then never
    runs an attention forward again (it would, under "proj", for its kernel's residuals and for the LoRA
    gradients of `proj`/`linear2`, whose input is the attention's output). The extra memory is the attention
    output, [tokens, hidden] a block, and its [heads, tokens] statistics. The XLA and splash paths keep what
    "proj" keeps (their attention residuals are not this primitive's)."""
    names = jax.checkpoint_policies.save_only_these_names("proj")

    def policy(prim, *args, **params):
        return prim.name == CUDNN_ATTENTION_FORWARD or names(prim, *args, **params)

    return policy


# Per-block rematerialisation: what the backward pass keeps from the forward.
REMAT_POLICIES: dict[str, Callable[[], Any] | None] = {
    "none": None,  # no remat: every intermediate is kept (fastest, most memory)
    "full": lambda: jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    "dots": lambda: jax.checkpoint_policies.dots_saveable,  # keep every matmul output
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmuls but attention's
    # every projection's output (base + LoRA summed), so LoRA's own matmul outputs are not kept twice
    "proj": lambda: jax.checkpoint_policies.save_only_these_names("proj"),
    "proj_attn": _save_proj_and_attention,  # "proj" + cuDNN attention's outputs: no attention forward recomputed
    "attn": lambda: jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),  # recompute the MLPs
    "offload": lambda: jax.checkpoint_policies.save_and_offload_only_these_names(  # to host memory
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(_OFFLOADED),
        offload_src="device", offload_dst="pinned_host"),
}
STACKED = ("double_blocks", "single_blocks")
LAYERS_AXIS = "layers"
# vmap/scan insert (remove) the "layers" name in the logical axes of stacked variables
_LAYERS_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS, layers.LOGICAL_AXES: LAYERS_AXIS}


def _stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` modules as one, every variable stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
    def create(r):
        return make(r)

    return create(rngs)


class Flux(nnx.Module):
    def __init__(self, params: FluxParams, *, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32,
                 dtype: DTypeLike | None = None, attention_impl: str = "xla", scan_layers: bool = False,
                 remat: str = "none", platform: str | None = None, rope_in_norm: bool = True):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {attention_impl!r}; "
                             f"choose from {layers.ATTENTION_IMPLEMENTATIONS}")
        self.params = params
        self.scan_layers = bool(scan_layers)
        self.remat = remat
        # the platform the model is traced for (attention kernels depend on it); None = the current backend
        self.platform = platform = layers.platform_or_default(platform)
        self.activation_sharding = None  # set by dd_jax.sharding.shard_model
        prec = Precision(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype or param_dtype))
        self.dtype = prec.dtype
        h = params.hidden_size
        self.img_in = layers.linear(params.in_channels, h, prec, rngs, axes=("input", "embed"))
        self.time_in = layers.MLPEmbedder(256, h, prec, rngs)
        self.vector_in = layers.MLPEmbedder(params.vec_in_dim, h, prec, rngs)
        self.guidance_in = layers.MLPEmbedder(256, h, prec, rngs) if params.guidance_embed else None
        self.txt_in = layers.linear(params.context_in_dim, h, prec, rngs, axes=("input", "embed"))
        double = lambda r: layers.DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias, prec, r,
                                                    attention_impl, platform, rope_in_norm)
        single = lambda r: layers.SingleStreamBlock(h, params.num_heads, params.mlp_ratio, prec, r, attention_impl,
                                                    platform, rope_in_norm)
        if self.scan_layers:
            self.double_blocks = _stack(double, params.depth, rngs)
            self.single_blocks = _stack(single, params.depth_single_blocks, rngs)
        else:
            self.double_blocks = nnx.List([double(rngs) for _ in range(params.depth)])
            self.single_blocks = nnx.List([single(rngs) for _ in range(params.depth_single_blocks)])
        self.final_layer = layers.LastLayer(h, params.out_channels, prec, rngs)

    def _run_stack(self, stack, carry, *args):
        """Runs blocks over `carry` as pure JAX (lax.scan / jax.checkpoint over split block states).

        Pure functions of the blocks' states rather than nnx.scan / nnx.remat: they work under any
        outer transform, including plain `jax.grad` of a model merged from split states.
        """
        policy = REMAT_POLICIES[self.remat]
        call = (lambda out: out if isinstance(out, tuple) else (out,))

        def apply(graphdef, state, carry):
            return call(nnx.merge(graphdef, state)(*carry, *args))

        if policy is not None:
            apply = jax.checkpoint(apply, policy=policy(), prevent_cse=not self.scan_layers, static_argnums=(0,))
        if self.scan_layers:
            graphdef, state = nnx.split(stack)
            carry, _ = jax.lax.scan(lambda c, st: (apply(graphdef, st, c), None), carry, state)
            return carry
        for block in stack:
            graphdef, state = nnx.split(block)
            carry = apply(graphdef, state, carry)
        return carry

    def _run_blocks(self, img, txt, vec, pe, vec_cond, img_mask, seq_mask):
        img, txt = self._run_stack(self.double_blocks, (img, txt), vec, pe, vec_cond, img_mask)
        n_txt = txt.shape[1]
        (x,) = self._run_stack(self.single_blocks, (jnp.concatenate([txt, img], axis=1),), vec, pe, vec_cond,
                               seq_mask)
        return x[:, n_txt:]

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
        img = layers.constrain(self.img_in(img.astype(self.dtype)), layers.ACT_EMBED, self.activation_sharding)
        txt = layers.constrain(self.txt_in(txt.astype(self.dtype)), layers.ACT_EMBED, self.activation_sharding)
        vec = self._vec(timesteps, y, guidance)
        vec_cond = img_mask = seq_mask = None
        if cond_mask is not None:
            vec_cond = self._vec(jnp.zeros_like(timesteps), y, guidance)
            img_mask = jnp.broadcast_to(jnp.asarray(cond_mask, bool), img.shape[:2])[..., None]
            seq_mask = jnp.concatenate([jnp.zeros(txt.shape[:2] + (1,), bool), img_mask], axis=1)

        ids = jnp.concatenate([jnp.broadcast_to(txt_ids, (batch,) + txt_ids.shape[-2:]),
                               jnp.broadcast_to(img_ids, (batch,) + img_ids.shape[-2:])], axis=1)
        pe = layers.embed_nd(ids, self.params.axes_dim, self.params.theta)

        img = self._run_blocks(img, txt, vec, pe, vec_cond, img_mask, seq_mask)
        return self.final_layer(img, vec, vec_cond, img_mask)


def set_rope_in_norm(model: Flux, value: bool) -> None:
    """Switches every block between RoPE inside the q/k norm's pass (True, the default) and after it (False),
    in place (e.g. to time both on the same weights; a sampler's cached split must be dropped after)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (layers.DoubleStreamBlock, layers.SingleStreamBlock)):
            node.rope_in_norm = bool(value)


def abstract(params: FluxParams, *, param_dtype: DTypeLike = jnp.float32,
             dtype: DTypeLike | None = None, attention_impl: str = "xla",
             scan_layers: bool = False, remat: str = "none", platform: str | None = None,
             rope_in_norm: bool = True) -> Flux:
    """The model's structure, shapes and dtypes, with no memory allocated."""
    return nnx.eval_shape(lambda: Flux(params, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype,
                                       attention_impl=attention_impl, scan_layers=scan_layers, remat=remat,
                                       platform=platform, rope_in_norm=rope_in_norm))


def _flat_paths(module: nnx.Module) -> list[tuple[str, tuple[int, ...]]]:
    _, state = nnx.split(module)
    return [(".".join(map(str, p)), tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(state)]


def stacked_sources(module: Flux) -> dict[str, list[str]]:
    """For a scanned model: stacked variable path -> the per-block paths it stacks, in order."""
    if not module.scan_layers:
        return {}
    out = {}
    for path, shape in _flat_paths(module):
        head, _, rest = path.partition(".")
        if head in STACKED:
            out[path] = [f"{head}.{i}.{rest}" for i in range(shape[0])]
    return out


def stack_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Per-block flat arrays (`double_blocks.3.x`) -> stacked ones (`double_blocks.x`, [depth, ...])."""
    groups: dict[str, dict[int, Any]] = {}
    out = {}
    for path, arr in flat.items():
        parts = path.split(".")
        if parts[0] in STACKED and len(parts) > 2 and parts[1].isdigit():
            groups.setdefault(".".join([parts[0]] + parts[2:]), {})[int(parts[1])] = arr
        else:
            out[path] = arr
    for path, layers_ in groups.items():
        if sorted(layers_) != list(range(len(layers_))):
            raise KeyError(f"{path}: blocks {sorted(layers_)} are not 0..{len(layers_) - 1}")
        stack = jnp.stack if isinstance(next(iter(layers_.values())), jax.Array) else np.stack
        out[path] = stack([layers_[i] for i in range(len(layers_))])
    return out


def unstack_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_flat`: BFL per-block paths again (for saving a scanned model)."""
    out = {}
    for path, arr in flat.items():
        head, _, rest = path.partition(".")
        if head in STACKED and rest and not rest.split(".")[0].isdigit():
            for i in range(arr.shape[0]):
                out[f"{head}.{i}.{rest}"] = arr[i]
        else:
            out[path] = arr
    return out


INITS = ("default", "adaln_zero")
# modules whose outputs adaLN-Zero starts at zero: every block's modulation (gates 0: blocks are the identity)
# and the final layer (output 0)
_ZERO_MODULES = ("img_mod", "txt_mod", "modulation", "final_layer")


def adaln_zero(model: Flux) -> Flux:
    """DiT's adaLN-Zero initialisation, in place, for training from scratch.

    Zeroes every block's modulation Linear (so each block starts as the
    identity, its residual gates 0) and the final layer (so the model starts
    by predicting 0, e.g. "no change" with a residual output reading). Pretrained
    Flux weights never need it.
    """
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if any(str(p) in _ZERO_MODULES for p in path):
            var.set_value(jnp.zeros_like(var.get_value()))
    nnx.update(model, state)
    return model


def load(path: str, dtype: DTypeLike | None = None, *, compute_dtype: DTypeLike | None = None,
         attention_impl: str = "xla", shardings: Shardings | None = None,
         scan_layers: bool = False, remat: str = "none", platform: str | None = None,
         convert: Convert | None = None, rope_in_norm: bool = True) -> Flux:
    """Loads a converted checkpoint (`scripts/convert_flux.py` output) into either layout.

    `dtype` is the parameter dtype (default: as stored); `compute_dtype`
    defaults to the parameter dtype. `shardings` (flat path -> Sharding, or a
    function of the abstract module returning that, e.g.
    `lambda m: dd_jax.sharding.flat_shardings(m, mesh, rules)`) places every
    array on devices as it is read. `convert` (see `store.load_module`) may place
    arrays itself as they are read, e.g. quantized (`dd_jax.quantize.loader`).
    """
    build = lambda cfg, pd: abstract(FluxParams.from_dict(cfg), param_dtype=pd, dtype=compute_dtype,
                                     attention_impl=attention_impl, scan_layers=scan_layers, remat=remat,
                                     platform=platform, rope_in_norm=rope_in_norm)
    return store.load_model(path, "flux", build, dtype, shardings=shardings, stacked=stacked_sources,
                            convert=convert)
