"""Ahead-of-time compilation of the training step on abstract shapes (no weights, no data).

`compile_train_step(config)` builds the model and optimizer with
`nnx.eval_shape` (nothing is allocated), lowers the production step (the
`flow.TrainStep` train.py runs, `flow.system_step`: trainable and optimizer state donated, the
frozen base a read-only input) on ShapeDtypeStructs of a batch and compiles
it for the local backend, so the paper's flux-dev LoRA step can be checked,
costed (XLA's cost analysis) and sized (XLA's memory analysis) on a machine
that could never hold it. `platforms=("cuda",)` / `("tpu",)` lowers it for
another backend instead (not compiled).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import flow, system as system_lib

if TYPE_CHECKING:
    import ml_collections


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    lowered: Any
    flops: float | None  # XLA's count for one step
    memory: Any  # compiled.memory_analysis() (may be None on some backends)
    tokens: int  # image + text tokens per example
    trainable_params: int
    total_params: int
    partition_bytes: dict  # trainable / frozen / mutable model state and optimizer state (TrainStep.partition_bytes)


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int | None = None, txt_len: int = 512) -> dict:
    """ShapeDtypeStructs of one pipeline batch (images in [-1, 1]; cached text for 'precomputed')."""
    d = config.data
    b = batch_size or d.batch_size
    img = jax.ShapeDtypeStruct((b, d.height, d.width, 3), jnp.float32)
    batch = {"composite": img, "background": img, "foreground": img, "task": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if config.text.kind == "precomputed":
        p = system_lib.flux_params(config.model)
        dt = jnp.dtype(config.model.compute_dtype or config.model.param_dtype)
        batch["txt"] = jax.ShapeDtypeStruct((b, txt_len, p.context_in_dim), dt)
        batch["vec"] = jax.ShapeDtypeStruct((b, p.vec_in_dim), dt)
    return batch


def compile_train_step(config: ml_collections.ConfigDict, batch_size: int | None = None, txt_len: int = 512,
                       compile: bool = True, platforms: tuple[str, ...] | None = None) -> CompiledStep:
    """The production train step (`flow.system_step`, what `train.py` runs) lowered on abstract shapes and,
    with `compile`, compiled for the local backend (`platforms`: lower for other backends, no compile)."""

    def init():
        model = system_lib.build_model(config, load_weights=False)
        return model, flow.system_optimizer(system_lib.wrap(model, config))

    model, optimizer = nnx.eval_shape(init)
    system = system_lib.wrap(model, config)
    step = flow.system_step(system)
    batch = abstract_batch(config, batch_size, txt_len)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    lowered = step.lower(model, optimizer, batch, key, platforms=platforms)
    compiled = lowered.compile() if compile and not platforms else None
    cost = (compiled or lowered).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    d = config.data
    h, w = system.grid(d.height, d.width)
    tokens = h * w * len(system.spec.layers) + (txt_len if config.text.kind == "precomputed" else config.text.length)
    count = lambda f: int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, f))))
    return CompiledStep(compiled, lowered, flops, compiled.memory_analysis() if compiled is not None else None,
                        tokens, count(system.trainable()), count(nnx.Param), step.partition_bytes(model, optimizer))
