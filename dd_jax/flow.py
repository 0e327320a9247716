"""Rectified-flow matching for In-Context Decomposition.

Convention (Flux's): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x0 + t eps,      target velocity v = eps - x0,

the model predicts v for the noisy target layers; the clean condition layer
is fed as is, and the loss is taken on the target tokens only.

`prediction="x0"` reads the network's output as the clean layer x0 and
turns it into a velocity, v = (x_t - x0_hat) / max(t, T_MIN), before the
same velocity loss (x-prediction with a v-loss, as in Li & He 2025, "Back
to Basics: Let Denoising Generative Models Denoise"). Models trained from
scratch on high-dimensional pixel tokens (the tiny config: 192-d tokens, a
128-d residual stream) learn this far faster than raw velocity; pretrained
Flux predicts velocity ("velocity", the default).

`residual` (x0 only) names targets whose output is read as an offset from
the condition layer, x0_hat = z + out, token by token: the network starts
from "the layer equals the composite" and learns what the foreground
changed. A small from-scratch model cannot squeeze a 192-d pixel token
through a 128-d stream exactly, so without it the composite's fine detail
is lost; a LoRA on Flux (velocity) never needs it.

`loss="x0"` weights the velocity loss by t^2 (t floored at T_MIN), which for
t >= T_MIN is the squared error of the clean layer, |x0_hat - x0|^2. With
x0-prediction the plain velocity loss puts ~90% of its weight on t < 0.2,
where the noisy layer nearly shows the answer; the x0 loss spreads it evenly
over t, so the high-noise steps that must infer the layer from the
composite are trained as much as the last ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dd_jax import icd, partition


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


PREDICTIONS = ("velocity", "x0")
LOSSES = ("velocity", "x0")
T_MIN = 0.05  # x0-prediction: the smallest t the velocity conversion divides by


def as_velocity(out: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str = "velocity",
                base: jax.Array | None = None) -> jax.Array:
    """The velocity a network output stands for (`t` per example); `base`: x0 = base + out."""
    if prediction == "velocity":
        if base is not None:
            raise ValueError("a residual (base) output needs prediction='x0'")
        return out
    if prediction != "x0":
        raise ValueError(f"prediction {prediction!r}; choose from {PREDICTIONS}")
    if base is not None:
        out = out + base
    t = jnp.maximum(jnp.asarray(t, jnp.float32), T_MIN).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return (x_t - out) / t


def target_velocities(spec: icd.LayerSpec, out: Mapping[str, jax.Array], xs: Mapping[str, jax.Array],
                      cond: jax.Array, t: jax.Array, prediction: str = "velocity",
                      residual: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Per target layer, the velocity the network's output tokens stand for."""
    unknown = set(residual) - set(spec.targets)
    if unknown:
        raise ValueError(f"residual layers {sorted(unknown)} are not targets {spec.targets}")
    return {n: as_velocity(out[n].astype(jnp.float32), xs[n], t, prediction,
                           cond.astype(jnp.float32) if n in residual else None) for n in spec.targets}


@dataclasses.dataclass(frozen=True)
class Batch:
    """What one ICD training step sees. Layer tokens are packed latents [B, N, C]."""

    layers: Mapping[str, jax.Array]  # condition and target layers, clean
    txt: jax.Array  # [B, L_txt, context_dim]
    txt_ids: jax.Array  # [L_txt, 3]
    y: jax.Array  # [B, vec_dim] pooled text / task vector
    grid: tuple[int, int]  # token grid (h, w) of every layer


def icd_loss(model: Callable, spec: icd.LayerSpec, batch: Batch, t: jax.Array, noise: Mapping[str, jax.Array],
             guidance: jax.Array | None = None, prediction: str = "velocity",
             residual: tuple[str, ...] = (), loss: str = "velocity") -> jax.Array:
    """Mean squared velocity error over the noisy target tokens (`loss="x0"`: weighted by t^2)."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}; choose from {LOSSES}")
    h, w = batch.grid
    tokens = {spec.condition: batch.layers[spec.condition]}
    for name in spec.targets:
        tokens[name] = interpolate(batch.layers[name], noise[name], t)
    img, img_ids, _, cond_mask = icd.build_sequence(spec, tokens, h, w)
    pred = model(img, jnp.asarray(img_ids), batch.txt, batch.txt_ids, t, batch.y, guidance,
                 cond_mask=jnp.asarray(cond_mask) if spec.condition_t0 else None)
    target = jnp.concatenate([velocity(batch.layers[n], noise[n]) for n in spec.targets], axis=1)
    vs = target_velocities(spec, icd.split_layers(spec, pred, h * w), tokens, batch.layers[spec.condition], t,
                           prediction, residual)
    pred = jnp.concatenate([vs[n] for n in spec.targets], axis=1)
    err = jnp.square(pred - target.astype(jnp.float32))
    if loss == "x0":
        err = err * jnp.square(jnp.maximum(t.astype(jnp.float32), T_MIN)).reshape((-1,) + (1,) * (err.ndim - 1))
    return jnp.mean(err)


def flux_mu(n_tokens: int, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> float:
    """Flux's resolution shift: mu linear in the (noisy) image token count."""
    return y1 + (y2 - y1) / (x2 - x1) * (n_tokens - x1)


def time_shift(t: jax.Array, mu: float) -> jax.Array:
    """t' = e^mu / (e^mu + 1/t - 1), with t' = 0 at t = 0."""
    t = jnp.asarray(t, jnp.float32)
    safe = jnp.where(t > 0, t, 1.0)
    return jnp.where(t > 0, jnp.exp(mu) / (jnp.exp(mu) + 1.0 / safe - 1.0), 0.0)


def schedule(steps: int, n_tokens: int, shift: bool = True) -> jax.Array:
    """Sampling times from 1 to 0 (steps + 1 values), shifted as Flux does."""
    t = jnp.linspace(1.0, 0.0, steps + 1)
    return time_shift(t, flux_mu(n_tokens)) if shift else t


T_SAMPLING = ("uniform", "logit_normal")


def sample_t(key: jax.Array, n: int, method: str = "uniform", shift_tokens: int | None = None,
             logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """Training times in (0, 1): uniform or logit-normal, optionally resolution-shifted."""
    if method == "uniform":
        t = jax.random.uniform(key, (n,), minval=1e-5, maxval=1.0)
    elif method == "logit_normal":
        t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,)))
    else:
        raise ValueError(f"t sampling {method!r}; choose from {T_SAMPLING}")
    return t if shift_tokens is None else time_shift(t, flux_mu(shift_tokens))


def sample_noise(key: jax.Array, spec: icd.LayerSpec, batch: Batch, t_sampling: str = "uniform",
                 shift: bool = False, **t_kwargs: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example t and Gaussian noise per target layer."""
    key_t, *keys = jax.random.split(key, len(spec.targets) + 1)
    h, w = batch.grid
    t = sample_t(key_t, batch.txt.shape[0], t_sampling, h * w * len(spec.targets) if shift else None, **t_kwargs)
    noise = {n: jax.random.normal(k, batch.layers[n].shape, jnp.float32) for n, k in zip(spec.targets, keys)}
    return t, noise


class TrainStep:
    """`step(model, optimizer, batch, key) -> (loss, grad_norm)`, updating the trainable partition and the
    optimizer state in place.

    One `jax.jit` function `(trainable, opt_state, mutable, frozen, batch, key) -> (trainable', opt_state',
    mutable', loss, grad_norm)` with trainable, opt_state and mutable donated: the model is split once
    (`partition`) into the `wrt` Variables, the other `nnx.Param`s (the frozen base: a read-only input, never
    returned) and anything else (`mutable`: non-parameter state such as RNG counters, returned and donated;
    empty for the models here). A step that writes to a frozen parameter fails when traced.

    `lower(model, optimizer, batch, key, platforms=None)` is the `jax.stages.Lowered` of exactly this
    function (abstract models from `nnx.eval_shape` and ShapeDtypeStruct batches work), `platforms` e.g.
    `("cuda",)` or `("tpu",)` to lower for a backend this machine does not have.
    """

    def __init__(self, body: Callable, wrt: Any):
        self.body = body  # (model, optimizer, batch, key) -> (loss, grad_norm), mutating; unjitted
        self.wrt = wrt
        self._filters = (wrt, nnx.Param, ...)
        self._splits = partition.Cache()
        self._jit = jax.jit(self._pure, static_argnums=(0, 1), donate_argnums=(2, 3, 4))

    def _pure(self, model_layout, opt_layout, trainable, opt_state, mutable, frozen, batch, key):
        model = model_layout.merge(trainable, frozen, mutable)
        optimizer = opt_layout.merge(opt_state)
        loss, grad_norm = self.body(model, optimizer, batch, key)
        new_trainable, new_frozen, new_mutable = model_layout.values_of(model)
        changed = [p for p, a, b in zip(model_layout.paths[1], frozen, new_frozen) if a is not b]
        if changed:
            raise ValueError(f"the step changed {len(changed)} frozen parameter(s) (not in wrt={self.wrt!r}), "
                             f"e.g. {'.'.join(map(str, changed[0]))}")
        (new_opt,) = opt_layout.values_of(optimizer)
        return new_trainable, new_opt, new_mutable, loss, grad_norm

    def _args(self, model, optimizer):
        m = self._splits.get(model, self._filters)
        o = self._splits.get(optimizer)
        return m, o, (m.layout, o.layout, m.values(0), o.values(0), m.values(2), m.values(1))

    def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Any, key: jax.Array, *,
                 executable: jax.stages.Compiled | None = None) -> tuple[jax.Array, jax.Array]:
        """One step; `executable`: a compiled `.lower(...)` of these shapes (e.g. with other XLA options)
        to run instead of the jitted function (the same program)."""
        m, o, args = self._args(model, optimizer)
        if executable is None:
            out = self._jit(*args, batch, key)
        else:
            out = executable(*args[2:], batch, key)  # a Compiled takes the non-static arguments
        trainable, opt_state, mutable, loss, grad_norm = out
        m.assign(0, trainable)
        m.assign(2, mutable)
        o.assign(0, opt_state)
        return loss, grad_norm

    def lower(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Any, key: jax.Array | jax.ShapeDtypeStruct,
              platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
        """The lowered production step (`.compile()`, `.cost_analysis()`, `.as_text()`)."""
        _, _, args = self._args(model, optimizer)
        traced = self._jit.trace(*args, batch, key)
        return traced.lower(lowering_platforms=tuple(platforms) if platforms else None)

    def partition_bytes(self, model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, int]:
        """Bytes of the trainable, frozen and other model state and of the optimizer state."""
        m, o, _ = self._args(model, optimizer)
        return {"trainable": m.nbytes(0), "frozen": m.nbytes(1), "mutable": m.nbytes(2), "optimizer": o.nbytes(0)}

    def forget(self, *nodes: nnx.Pytree) -> None:
        """Drops the cached splits of `nodes` (their structure changed)."""
        for n in nodes:
            self._splits.forget(n)


def make_train_step(spec: icd.LayerSpec, wrt: Any = nnx.LoRAParam, guidance: float | None = None,
                    prepare: Callable | None = None, t_sampling: str = "uniform", shift: bool = False,
                    jit: bool = True, prediction: str = "velocity", residual: tuple[str, ...] = (),
                    loss: str = "velocity", **t_kwargs: float) -> TrainStep | Callable:
    """The training step `(model, optimizer, batch, key) -> (loss, grad_norm)` updating only `wrt`
    (a `TrainStep`: donated, the frozen base a read-only input; `.lower(...)` for AOT).

    `prepare(model, batch) -> (transformer, Batch)` turns what the input
    pipeline gives into ICD tokens inside the jitted step (encode images,
    look up conditioning); by default `model` is the transformer and `batch`
    already a `Batch`. `jit=False` returns the plain, unjitted function the
    step runs (a reference for tests).
    """

    def step(model, optimizer: nnx.Optimizer, batch, key: jax.Array):
        def loss_fn(m):
            transformer, b = prepare(m, batch) if prepare is not None else (m, batch)
            t, noise = sample_noise(key, spec, b, t_sampling, shift, **t_kwargs)
            g = None if guidance is None else jnp.full(t.shape, guidance, jnp.float32)
            return icd_loss(transformer, spec, b, t, noise, g, prediction, residual, loss)

        value, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return value, optax.global_norm(grads)

    return TrainStep(step, wrt) if jit else step


def make_optimizer(model: nnx.Module, learning_rate: float = 1e-4, wrt: Any = nnx.LoRAParam,
                   weight_decay: float = 0.0, warmup_steps: int = 0, clip_norm: float | None = None,
                   decay_steps: int | None = None) -> nnx.Optimizer:
    """AdamW with linear warmup (then constant, or cosine decay to 10%) and global-norm clipping."""
    if decay_steps and decay_steps <= warmup_steps:
        raise ValueError(f"decay over {decay_steps} steps must be longer than the {warmup_steps} warmup steps")
    if decay_steps:
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), decay_steps,
                                                end_value=0.1 * learning_rate)
    elif warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                   optax.constant_schedule(learning_rate)], [warmup_steps])
    else:
        lr = learning_rate
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(lr, weight_decay=weight_decay))
    return nnx.Optimizer(model, optax.chain(*chain), wrt=wrt)


def learning_rate_at(step: int, learning_rate: float, warmup_steps: int = 0, decay_steps: int | None = None) -> float:
    """The schedule of `make_optimizer`, for logging."""
    if warmup_steps and step < warmup_steps:
        return learning_rate * step / warmup_steps
    if decay_steps:
        frac = min(max(step - warmup_steps, 0) / max(decay_steps - warmup_steps, 1), 1.0)
        return learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return learning_rate



# ------------------------------------------------------------------ a system's step and optimizer
def system_step(system: Any, jit: bool = True) -> TrainStep:
    """The training step of a `dd_jax.system.System`, set by its config's `train` fields: the step
    `python -m dd_jax.train` runs (and `dd_jax.aot`, the benchmarks and memory plans lower)."""
    t = system.config.train
    return make_train_step(system.spec, wrt=system.trainable(), guidance=system.guidance, prepare=system.prepare,
                           t_sampling=t.t_sampling, shift=t.t_shift, jit=jit, loss=t.loss,
                           **system.output_reading())


def system_optimizer(system: Any) -> nnx.Optimizer:
    """The optimizer of a `dd_jax.system.System`'s trainable partition, set by its config's `train` fields
    (training, and the optimizer state a checkpoint holds)."""
    t = system.config.train
    return make_optimizer(system.model, t.learning_rate, wrt=system.trainable(), weight_decay=t.weight_decay,
                          warmup_steps=t.warmup_steps, clip_norm=t.clip_norm,
                          decay_steps=t.steps if t.decay else None)

jax.tree_util.register_dataclass(Batch, data_fields=["layers", "txt", "txt_ids", "y"], meta_fields=["grid"])
