"""Ahead-of-time compilation of the training step on abstract shapes (no weights, no data).

`compile_train_step(config)` builds the model and optimizer with
`nnx.eval_shape` (nothing is allocated), lowers the production step (the
`flow.TrainStep` train.py runs, `flow.system_step`: trainable and optimizer state donated, the
frozen base a read-only input) on ShapeDtypeStructs of a batch and compiles
it for the local backend, so the paper's flux-dev LoRA step can be checked,
costed (XLA's cost analysis) and sized (XLA's memory analysis) on a machine
that could never hold it. `platforms=("cuda",)` / `("tpu",)` lowers it for
another backend instead (not compiled).

`compile_decompose(config)` does the same for one decomposition batch (VAE
encode, the Euler sampler, VAE decode; T5 not on the device: the prompts'
embeddings are inputs), e.g. to size a quantized flux-dev (`model.quantize`,
`dd_jax.quantize`) for a 24 GB GPU. `time_quantized_steps(config)` builds such
a model with random weights on the device (`random_state`: quantized kernels
made in their storage type, no float copy) and times a sampler call and a
QLoRA step: the device check's quantized rows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import flow, quantize as quantize_lib, sampling, system as system_lib

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


GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpu_targets")


def gpu_targets() -> list[str]:
    """The GPU models `gpu_mesh` can compile for (dd_jax/assets/gpu_targets/<name>.txtpb: XLA's TargetConfig
    of one GPU, as `xla_gpu_target_config_filename` reads it)."""
    return sorted(f[: -len(".txtpb")] for f in os.listdir(GPU_TARGETS_DIR) if f.endswith(".txtpb"))


def gpu_mesh(target: str = "h100_80gb") -> jax.sharding.Mesh:
    """A one-device mesh of a GPU that is not here: XLA:GPU compiles for it on this machine ("deviceless"
    ahead-of-time compilation; it needs jax's CUDA plugin installed, not a GPU). Give abstract inputs a sharding
    on it (`on_mesh`) and `.lower(...).compile()` produces XLA:GPU's optimized program and memory analysis for
    that GPU. Run with JAX_PLATFORMS=cpu where there is no GPU."""
    from jax.experimental import topologies

    if target not in gpu_targets():
        raise ValueError(f"GPU target {target!r}; choose from {gpu_targets()}")
    with open(os.path.join(GPU_TARGETS_DIR, target + ".txtpb")) as f:
        config = f.read()
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    except Exception as e:  # no CUDA plugin: one line
        raise RuntimeError(f"compiling for a GPU here needs jax's CUDA plugin (pip install 'jax[cuda13]'): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return topologies.make_mesh(topo=topo, mesh_shape=(1,), axis_names=("gpu",))


def on_mesh(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Abstract arrays (ShapeDtypeStructs, and an nnx module's or optimizer's from `nnx.eval_shape`) replicated on
    `mesh` (None: as they are). Modules are changed in place and returned."""
    if mesh is None:
        return tree
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) if hasattr(a, "shape") else a
    if isinstance(tree, nnx.Pytree):
        for _, var in nnx.to_flat_state(nnx.state(tree)):
            var.set_value(place(var.get_value()))
        return tree
    return jax.tree.map(place, tree)


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
                       compile: bool = True, platforms: tuple[str, ...] | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> CompiledStep:
    """The production train step (`flow.system_step`, what `train.py` runs) lowered on abstract shapes and,
    with `compile`, compiled for the local backend (`platforms`: lower for other backends, no compile; `mesh`:
    compile for its devices, e.g. `gpu_mesh()`'s GPU that is not here)."""

    def init():
        model = system_lib.build_model(config, load_weights=False)
        return model, flow.system_optimizer(system_lib.wrap(model, config))

    model, optimizer = nnx.eval_shape(init)
    model, optimizer = on_mesh(model, mesh), on_mesh(optimizer, mesh)
    system = system_lib.wrap(model, config)
    step = flow.system_step(system)
    batch = on_mesh(abstract_batch(config, batch_size, txt_len), mesh)
    key = on_mesh(jax.ShapeDtypeStruct((), jax.random.key(0).dtype), mesh)
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


@dataclasses.dataclass
class CompiledDecompose:
    compiled: Any
    lowered: Any
    memory: Any  # compiled.memory_analysis()
    tokens: int  # image + text tokens per example in the transformer
    weights_bytes: dict  # {"transformer", "lora" (its float adapters), "vae"}: bytes of the read-only weights


def abstract_model(config: ml_collections.ConfigDict, qtype: str, seed: int | None = None) -> system_lib.Decomposer:
    """`build_model` without weights, the transformer quantized `qtype` (a LoRA model's base; a model trained in
    full whole, as decomposition quantizes it). Call under `nnx.eval_shape`."""
    with quantize_lib.requested(qtype):
        model = system_lib.build_model(config, seed=seed, load_weights=False)
    quantize_lib.quantize_module(model.transformer, qtype, quantize_lib.FLUX_TARGETS)
    return model


def compile_decompose(config: ml_collections.ConfigDict, batch_size: int = 1, txt_len: int = 512, steps: int = 2,
                      compile: bool = True, platforms: tuple[str, ...] | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> CompiledDecompose:
    """One decomposition batch as `system.decompose` runs it (VAE-encode the composite, `steps` Euler steps,
    VAE-decode the target layers) jitted as one program over abstract weights (quantized as `model.quantize`
    says) and abstract inputs (composite [B, H, W, 3] at data.height x data.width, the prompt's `txt`/`vec`),
    lowered and, with `compile`, compiled for the local backend (`mesh`: for its devices). Its memory analysis
    sizes decomposition with the transformer and the VAE resident and T5 not (`dd_jax.prompts`: prompts are
    encoded before)."""
    model = nnx.eval_shape(lambda: abstract_model(config, quantize_lib.configured(config)))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    d, p = config.data, model.transformer.params
    dt = jnp.dtype(config.model.compute_dtype or config.model.param_dtype)
    composite = jax.ShapeDtypeStruct((batch_size, d.height, d.width, 3), jnp.float32)
    txt = jax.ShapeDtypeStruct((batch_size, txt_len, p.context_in_dim), dt)
    vec = jax.ShapeDtypeStruct((batch_size, p.vec_in_dim), dt)
    task = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def run(leaves, composite, task, txt, vec, key):
        system = system_lib.wrap(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), config)
        return system_lib.decompose(system, composite, task, key, steps, extra={"txt": txt, "vec": vec})

    leaves, composite, task, txt, vec, key = on_mesh((leaves, composite, task, txt, vec, key), mesh)
    lowered = jax.jit(run).trace(leaves, composite, task, txt, vec, key).lower(
        lowering_platforms=tuple(platforms) if platforms else None)
    compiled = lowered.compile() if compile and not platforms else None
    system = system_lib.wrap(model, config)
    h, w = system.grid(d.height, d.width)
    size = lambda m, *f: quantize_lib.nbytes(nnx.state(m, *f)) if m is not None else 0
    return CompiledDecompose(compiled, lowered, compiled.memory_analysis() if compiled is not None else None,
                             h * w * len(system.spec.layers) + txt_len,
                             {"transformer": size(model.transformer), "lora": size(model.transformer, nnx.LoRAParam),
                              "vae": size(model.vae)})


def random_state(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fills an abstract module (`nnx.eval_shape`) with random values one Variable at a time, on the default
    device: quantized kernels random in their storage type (no float copy of them ever exists), float
    parameters N(0, 0.02), LoRA B zero. For timing and memory at full size without the weights."""
    graphdef, state = nnx.split(module)
    key = jax.random.key(seed)
    make = {}
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        a = var.get_value()
        k = jax.random.fold_in(key, i)
        shape, dtype = tuple(a.shape), jnp.dtype(a.dtype)
        kind = ("q" if isinstance(var, quantize_lib.QuantizedParam) and path[-1] == "qvalue" else
                "scale" if isinstance(var, quantize_lib.QuantizedParam) else
                "zero" if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b" else
                "int" if jnp.issubdtype(dtype, jnp.integer) or not jnp.issubdtype(dtype, jnp.floating) else "normal")
        if (shape, dtype, kind) not in make:
            make[shape, dtype, kind] = jax.jit(_random_fn(shape, dtype, kind))
        var.set_value(make[shape, dtype, kind](k))
    return nnx.merge(graphdef, state)


def _random_fn(shape, dtype, kind):
    def f(k):
        if kind == "q":
            hi = 7 if dtype == jnp.dtype(jnp.int4) else 127
            if jnp.issubdtype(dtype, jnp.integer):
                return jax.random.randint(k, shape, -hi, hi + 1, jnp.int32).astype(dtype)
            return (jax.random.normal(k, shape, jnp.float32) * 100).astype(dtype)
        if kind == "scale":
            return jnp.full(shape, 0.02 / 64, dtype)
        if kind == "zero":
            return jnp.zeros(shape, dtype)
        if kind == "int":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return f


def time_quantized_steps(config: ml_collections.ConfigDict, qtype: str = "int8", *, steps: int = 2,
                         repeats: int = 3, batch_size: int = 1, txt_len: int = 512, train: bool = True,
                         seed: int = 0) -> dict[str, Any]:
    """Builds `config`'s system quantized `qtype` with random weights on the default device (`random_state`:
    flux-dev needs no checkpoint) and times, after one compiling call each, the sampler (`steps` Euler steps
    of `sampling.sample`, batch `batch_size`, `txt_len` text tokens) and, with `train`, one QLoRA training
    step (`flow.system_step`, LoRA over the quantized base; needs lora.enabled). Returns
    {"qtype", "device", "weights_bytes" (transformer, quantized + float), "sampler": {"compile_s",
    "seconds" (median of `repeats`), "steps"}, "train": {"compile_s", "seconds"} or None, "peak_bytes"
    (the device's peak_bytes_in_use after both, None where memory_stats is missing)}.

    For a device-check section: `dd_jax.aot.time_quantized_steps(config, "int8")` with e.g.
    `configs/flux.py:dev` at data.height = data.width = 512, model.attention = "auto"."""
    qtype = quantize_lib.check(qtype) or "int8"
    config = config.copy_and_resolve_references()
    config.model.quantize = qtype
    if train and not config.lora.enabled:
        raise ValueError("the QLoRA step needs lora.enabled")

    def init():
        model = abstract_model(config, qtype, seed)
        return model, (flow.system_optimizer(system_lib.wrap(model, config)) if train else None)

    model, optimizer = nnx.eval_shape(init)
    model = random_state(model, seed)
    system = system_lib.wrap(model, config)
    out: dict[str, Any] = {"qtype": qtype, "device": str(jax.devices()[0]), "steps": steps, "batch_size": batch_size,
                           "weights_bytes": quantize_lib.nbytes(nnx.state(model.transformer))}
    rng = np.random.default_rng(seed)
    d, p = config.data, model.transformer.params
    h, w = system.grid(d.height, d.width)
    dt = jnp.dtype(config.model.compute_dtype or config.model.param_dtype)
    cond = jnp.asarray(rng.standard_normal((batch_size, h * w, p.in_channels)), jnp.float32)
    txt = jnp.asarray(rng.standard_normal((batch_size, txt_len, p.context_in_dim)), dt)
    vec = jnp.asarray(rng.standard_normal((batch_size, p.vec_in_dim)), dt)

    def run_sampler(i):
        y = sampling.sample(system.model.transformer, system.spec, cond, txt, vec, jax.random.key(i), (h, w), steps,
                            system.guidance, **system.output_reading())
        jax.block_until_ready(y)

    out["sampler"] = _timed(run_sampler, repeats)
    out["sampler"]["steps"] = steps
    out["train"] = None
    if train:
        optimizer = random_state(optimizer, seed + 1)
        step = flow.system_step(system)
        abstract = abstract_batch(config, batch_size, txt_len)
        batch = {k: (jnp.asarray(rng.uniform(-1, 1, v.shape), v.dtype) if k != "task"
                     else jnp.zeros(v.shape, v.dtype)) for k, v in abstract.items()}
        out["train"] = _timed(lambda i: jax.block_until_ready(step(system.model, optimizer, batch,
                                                                   jax.random.key(i))), repeats)
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    out["peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    return out


def _timed(fn: Callable[[int], Any], repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    fn(0)
    compile_s = time.perf_counter() - t0
    runs = []
    for i in range(1, max(1, repeats) + 1):
        t0 = time.perf_counter()
        fn(i)
        runs.append(time.perf_counter() - t0)
    return {"compile_s": round(compile_s, 3), "seconds": round(float(np.median(runs)), 4)}
