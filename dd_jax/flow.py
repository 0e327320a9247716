"""Rectified-flow matching for In-Context Decomposition.

Convention (Flux's): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x0 + t eps,      target velocity v = eps - x0,

the model predicts v for the noisy target layers; the clean condition layer
is fed as is, and the loss is taken on the target tokens only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dd_jax import icd


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


@dataclasses.dataclass(frozen=True)
class Batch:
    """What one ICD training step sees. Layer tokens are packed latents [B, N, C]."""

    layers: Mapping[str, jax.Array]  # condition and target layers, clean
    txt: jax.Array  # [B, L_txt, context_dim]
    txt_ids: jax.Array  # [L_txt, 3]
    y: jax.Array  # [B, vec_dim] pooled text / task vector
    grid: tuple[int, int]  # token grid (h, w) of every layer


def icd_loss(model: Callable, spec: icd.LayerSpec, batch: Batch, t: jax.Array, noise: Mapping[str, jax.Array],
             guidance: jax.Array | None = None) -> jax.Array:
    """Mean squared velocity error over the noisy target tokens."""
    h, w = batch.grid
    tokens = {spec.condition: batch.layers[spec.condition]}
    for name in spec.targets:
        tokens[name] = interpolate(batch.layers[name], noise[name], t)
    img, img_ids, _, cond_mask = icd.build_sequence(spec, tokens, h, w)
    pred = model(img, jnp.asarray(img_ids), batch.txt, batch.txt_ids, t, batch.y, guidance,
                 cond_mask=jnp.asarray(cond_mask) if spec.condition_t0 else None)
    target = jnp.concatenate([velocity(batch.layers[n], noise[n]) for n in spec.targets], axis=1)
    pred = icd.targets_of(spec, pred, h * w).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - target.astype(jnp.float32)))


def sample_noise(key: jax.Array, spec: icd.LayerSpec, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Uniform t in (0, 1) per example and Gaussian noise per target layer."""
    key_t, *keys = jax.random.split(key, len(spec.targets) + 1)
    bsz = batch.txt.shape[0]
    t = jax.random.uniform(key_t, (bsz,))
    noise = {n: jax.random.normal(k, batch.layers[n].shape, jnp.float32) for n, k in zip(spec.targets, keys)}
    return t, noise


def make_train_step(spec: icd.LayerSpec, wrt: Any = nnx.LoRAParam, guidance: float | None = None):
    """A jitted step `(model, optimizer, batch, key) -> loss` updating only `wrt` variables."""

    @nnx.jit
    def step(model, optimizer: nnx.Optimizer, batch: Batch, key: jax.Array):
        t, noise = sample_noise(key, spec, batch)
        g = None if guidance is None else jnp.full(t.shape, guidance, jnp.float32)

        def loss_fn(m):
            return icd_loss(m, spec, batch, t, noise, g)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    return step


def make_optimizer(model: nnx.Module, learning_rate: float = 1e-4, wrt: Any = nnx.LoRAParam,
                   weight_decay: float = 0.0) -> nnx.Optimizer:
    return nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=wrt)


jax.tree_util.register_dataclass(Batch, data_fields=["layers", "txt", "txt_ids", "y"], meta_fields=["grid"])
