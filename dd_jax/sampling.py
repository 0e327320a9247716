"""Euler sampling of the ICD target layers with Flux's shifted schedule.

The condition layer stays clean; every target layer starts from Gaussian
noise at t = 1 and follows the predicted velocity to t = 0:

    x_{t_next} = x_t + (t_next - t) * v(x_t, t)

with t on `flow.schedule(steps, n_noisy_tokens)` (Flux's resolution shift
computed from the noisy token count). The whole loop is one jitted
`fori_loop`, so one compilation serves every batch of the same shape.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from dd_jax import flow, icd, partition

if TYPE_CHECKING:
    from flax import nnx

_SPLITS = partition.Cache()


def _args(transformer, spec, cond, txt, vec, key, grid, steps, guidance, shift, prediction, residual):
    split = _SPLITS.get(transformer)
    return (split.layout, split.values(0), spec, cond, txt, vec, key, tuple(grid), int(steps),
            None if guidance is None else float(guidance), bool(shift), prediction, tuple(residual))


def sample(transformer: nnx.Module, spec: icd.LayerSpec, cond: jax.Array, txt: jax.Array, vec: jax.Array,
           key: jax.Array, grid: tuple[int, int], steps: int, guidance: float | None = None, shift: bool = True,
           prediction: str = "velocity", residual: tuple[str, ...] = (), *,
           executable: jax.stages.Compiled | None = None) -> dict[str, jax.Array]:
    """Target-layer tokens {name: [B, h*w, C]} for condition tokens `cond` [B, h*w, C].

    `prediction` and `residual` say how the network's output is read (see `flow`). The transformer's
    state is a read-only input of the compiled sampler, which returns the samples only (`partition`:
    the transformer is split once per object; after changing its structure call `forget(transformer)`).
    `executable`: a compiled `lower_sample(...)` of these arguments to run instead (the same program)."""
    args = _args(transformer, spec, cond, txt, vec, key, grid, steps, guidance, shift, prediction, residual)
    if executable is not None:
        return executable(*(args[i] for i in _DYNAMIC))
    return _sample(*args)


def lower_sample(transformer: nnx.Module, spec: icd.LayerSpec, cond: jax.Array | jax.ShapeDtypeStruct,
                 txt: jax.Array | jax.ShapeDtypeStruct, vec: jax.Array | jax.ShapeDtypeStruct,
                 key: jax.Array | jax.ShapeDtypeStruct, grid: tuple[int, int], steps: int,
                 guidance: float | None = None, shift: bool = True, prediction: str = "velocity",
                 residual: tuple[str, ...] = (), platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
    """The `jax.stages.Lowered` of the sampler `sample` runs, for these arguments (abstract ones work:
    an `nnx.eval_shape` transformer, ShapeDtypeStructs); `platforms` e.g. `("cuda",)` or `("tpu",)`."""
    traced = _sample.trace(*_args(transformer, spec, cond, txt, vec, key, grid, steps, guidance, shift,
                                  prediction, residual))
    return traced.lower(lowering_platforms=tuple(platforms) if platforms else None)


def forget(transformer: nnx.Module) -> None:
    """Drops the sampler's cached split of `transformer` (its structure changed)."""
    _SPLITS.forget(transformer)


_STATIC = (0, 2, 7, 8, 9, 10, 11, 12)
_DYNAMIC = (1, 3, 4, 5, 6)  # what a compiled sampler takes: state, cond, txt, vec, key


@functools.partial(jax.jit, static_argnums=_STATIC)
def _sample(layout, state, spec, cond, txt, vec, key, grid, steps, guidance, shift, prediction, residual):
    transformer = layout.merge(state)
    h, w = grid
    n = h * w
    bsz = cond.shape[0]
    keys = jax.random.split(key, len(spec.targets))
    noise = {name: jax.random.normal(k, cond.shape, jnp.float32) for name, k in zip(spec.targets, keys)}
    ts = flow.schedule(steps, n * len(spec.targets), shift)
    txt_ids = jnp.zeros((txt.shape[1], 3), jnp.float32)
    img_ids = jnp.asarray(icd.position_ids(spec, h, w))
    cond_mask = jnp.asarray(icd.masks(spec, n)[1]) if spec.condition_t0 else None
    g = None if guidance is None else jnp.full((bsz,), guidance, jnp.float32)

    def body(i, xs):
        t, t_next = ts[i], ts[i + 1]
        img = jnp.concatenate([cond.astype(jnp.float32)] + [xs[name] for name in spec.targets], axis=1)
        v = transformer(img, img_ids, txt, txt_ids, jnp.full((bsz,), t), vec, g, cond_mask=cond_mask)
        vs = flow.target_velocities(spec, icd.split_layers(spec, v, n), xs, cond, jnp.full((bsz,), t), prediction,
                                    residual)
        return {name: xs[name] + (t_next - t) * vs[name] for name in spec.targets}

    return jax.lax.fori_loop(0, steps, body, noise)
