"""LoRA as an NNX parameter partition.

`apply_lora(model, rank, alpha, targets)` replaces every `nnx.Linear` whose
dotted path matches one of the `targets` regexes with a `LoRALinear` that
keeps the base `kernel`/`bias` Variables at the same paths (so converted
base checkpoints load unchanged) and adds `lora_a` [in, r] and `lora_b`
[r, out] of type `nnx.LoRAParam`, B zero-initialised, scaled by alpha / r:

    y = x @ W + b + (alpha / r) * (x @ A) @ B

Train with `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and gradients
w.r.t. `nnx.LoRAParam`: the frozen base then has neither gradients nor
optimizer state. `merge_lora(model)` folds the update into the base kernels
and turns the wrapped layers back into plain `nnx.Linear`. The base kernel may
be stored quantized (`dd_jax.quantize.QKernel`, QLoRA): the adapters stay float
and the base matmul dequantizes it; such a base is not merged into.

Fused projections (BFL's `qkv`, `linear1`) carry one LoRA over the fused
output; it splits exactly into per-projection adapters for export (A shared,
B sliced by output columns).

Scanned models (`Flux(scan_layers=True)`) hold stacked Linears (kernel
[layers, in, out]); their adapters are stacked too (A [layers, in, r], B
[layers, r, out]), and targets are matched against the per-block path
(`double_blocks.<i>.img_attn.qkv`): a pattern must select all of a stack's
layers or none. Adapters carry the logical axis names of their base kernel
(A: (in, "lora_rank"), B: ("lora_rank", out)), so they shard like it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from jax.typing import DTypeLike

# Every projection of attention and MLP in both streams, and the single
# blocks' fused linear1/linear2 (the issue's default set).
DEFAULT_TARGETS: tuple[str, ...] = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)",
    r"single_blocks\.\d+\.linear(1|2)",
)
# Optional: the adaLN modulation projections.
MODULATION_TARGETS: tuple[str, ...] = (
    r"double_blocks\.\d+\.(img|txt)_mod\.lin",
    r"single_blocks\.\d+\.modulation\.lin",
)


class LoRALinear(nnx.Module):
    """A Linear with a low-rank update; base Variables are shared with the wrapped layer."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 param_dtype: DTypeLike = jnp.float32):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        self.rank = rank
        self.scale = alpha / rank
        # A: Kaiming-uniform over fan-in (as peft's default); B: zeros, so the start is the base model.
        bound = 1.0 / (self.in_features ** 0.5)
        lead = tuple(base.kernel.shape[:-2])  # (layers,) for a stacked Linear
        names = base.kernel.get_metadata().get("logical_axes")
        meta_a = meta_b = {}
        if names:
            meta_a = {"logical_axes": tuple(names[:-1]) + ("lora_rank",)}
            meta_b = {"logical_axes": tuple(names[:-2]) + ("lora_rank", names[-1])}
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), lead + (self.in_features, rank), param_dtype,
                                                       -bound, bound), **meta_a)
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, self.out_features), param_dtype), **meta_b)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        lead = x.shape[:-1]
        # 2-D matmuls: with [batch, tokens, in] inputs the adapter gradients contract over two dims,
        # which XLA canonicalises by transposing the (large) output cotangent; [batch*tokens, in] does not.
        x = x.astype(dtype).reshape(-1, x.shape[-1])
        if hasattr(self.kernel, "matmul"):  # a quantized base (dd_jax.quantize.QKernel)
            y = self.kernel.matmul(x, dtype)
        else:
            y = x @ self.kernel[...].astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        u = (x @ self.lora_a[...].astype(dtype)) * jnp.asarray(self.scale, dtype)  # scale the thin [T, r] side
        return (y + u @ self.lora_b[...].astype(dtype)).reshape(lead + (y.shape[-1],))

    def delta_kernel(self) -> jax.Array:
        """The update as a dense [(layers,) in, out] matrix, in float32."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def _selected(path: Sequence, node: nnx.Linear, patterns: Sequence[str]) -> bool:
    """Whether the targets select this Linear; a stacked one is matched per layer."""
    if len(node.kernel.shape) == 2:
        return _matches(_path_str(path), patterns)
    hits = [_matches(_path_str((path[0], i) + tuple(path[1:])), patterns) for i in range(node.kernel.shape[0])]
    if any(hits) and not all(hits):
        raise ValueError(f"LoRA targets select only some layers of the stacked {_path_str(path)}; "
                         "use the unscanned layout (scan_layers=False) for per-block targets")
    return all(hits)


def replace_submodule(model: nnx.Module, path: tuple, new) -> None:
    """Puts `new` at `path` (attribute names and list indices) inside `model`, in place of what is there."""
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(parent, nnx.List) else getattr(parent, p)
    if isinstance(parent, nnx.List):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(model: nnx.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] = DEFAULT_TARGETS, *, rngs: nnx.Rngs | None = None,
               param_dtype: DTypeLike = jnp.float32) -> list[str]:
    """Wraps the matching Linear layers in place; returns their paths. alpha defaults to rank."""
    alpha = float(rank if alpha is None else alpha)
    rngs = rngs or nnx.Rngs(0)
    found = [(path, node) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Linear) and _selected(path, node, targets)]
    if not found:
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}")
    for path, node in found:
        replace_submodule(model, tuple(path), LoRALinear(node, rank, alpha, rngs=rngs, param_dtype=param_dtype))
    return [_path_str(p) for p, _ in found]


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    return [(_path_str(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every LoRA update into its base kernel and removes the adapters (in place)."""
    for path, node in [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]:
        if not isinstance(node.kernel, nnx.Variable):
            raise ValueError(f"{_path_str(path)}: the base kernel is stored quantized (dd_jax.quantize); merge the "
                             "LoRA into a float base (load it without quantize) or keep the adapters separate")
        kernel = node.kernel[...]
        merged = (kernel.astype(jnp.float32) + node.delta_kernel()).astype(kernel.dtype)
        linear = nnx.eval_shape(lambda: nnx.Linear(node.in_features, node.out_features,
                                                   use_bias=node.bias is not None, dtype=node.dtype,
                                                   param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
        linear.kernel = nnx.Param(merged, **node.kernel.get_metadata())
        if node.bias is not None:
            linear.bias = node.bias
        replace_submodule(model, tuple(path), linear)
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """Only the LoRA parameters (what a fine-tuning checkpoint needs)."""
    return nnx.state(model, nnx.LoRAParam)
