"""Training: `python -m dd_jax.train --config configs/xray.py --workdir DIR [--config.train.steps=100]`.

One jitted flow-matching step per batch (ICD layout, loss on the noisy
layers), AdamW on the trainable partition (LoRA parameters, or everything
when training from scratch). The workdir holds

    config.json            the resolved config (what `decompose` rebuilds from)
    checkpoints/<step>/    orbax: trainable params + optimizer state, data iterator state
    export/                trainable params only, a dd_jax model folder (at the end)
    metrics.jsonl          every step's loss, and the logged scalars
    tb/                    TensorBoard event files (scalars, preview images)
    previews/step_N.png    composite | predicted layers | truth

A run resumes from the newest checkpoint in its workdir. SIGTERM/SIGINT save
a checkpoint before exiting; a non-finite loss stops the run with a message
and keeps the last good checkpoint.

Sharding (`config.mesh`, `dd_jax.sharding`): the model and optimizer state
are placed on a (data, fsdp, tensor) mesh over every device of every
process by their logical axis names, the global batch is split over
(data, fsdp). Multi-process runs (`config.distributed`, or a launcher's
environment) start the same command on every host: each process reads its
own Grain shards of the data (`data.shards`, default one per process) and
`sharding.shard_batch` assembles the global batch; every process runs the
steps, checkpoints (orbax writes the sharded state), previews and the
export gather; process 0 alone writes metrics, TensorBoard, previews and
the export folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dd_jax import flow, hostmem, sharding, system as system_lib
from dd_jax.data import pipeline
from dd_jax.models import store

ARRAY_KEYS = ("composite", "background", "foreground", "task", "txt", "vec")


class NonFiniteLoss(RuntimeError):
    pass


def save_config(config, path: str) -> None:
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=1))


def load_config(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def device_batch(batch: dict, mesh=None, rules=None) -> dict:
    """The model's inputs of a process-local numpy batch; with `mesh`, global arrays split over (data, fsdp)."""
    arrays = {k: v for k, v in batch.items() if k in ARRAY_KEYS}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding.shard_batch(arrays, mesh, rules)


def to_host(tree):
    """Numpy copies of (possibly sharded, multi-process) arrays; every process must call it (a collective
    when some array spans other processes' devices)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)


def _any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a stop must be taken by all processes together:
    a checkpoint save alone would wait forever for the others)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def agrees_on_stop_at(step: int, sync_every: int, process_count: int | None = None) -> bool:
    """Whether the processes exchange their stop flags after `step`: every step on one process (no collective),
    else only at multiples of `sync_every`, the same steps on every process (so they stop at the same step)."""
    n = jax.process_count() if process_count is None else process_count
    return n == 1 or step % max(1, sync_every) == 0


class _Stop:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Checkpoints:
    """Orbax CheckpointManager over (trainable state, optimizer state, data iterator state)."""

    def __init__(self, directory: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, wait: bool = True) -> None:
        """Saves; `wait=False` returns once the arrays are copied to the host (orbax's blocking part: with no
        device-to-host byte limit every array is transferred before `save` returns, so the next step may
        donate them) and writes the files in the background (the next save or `close` waits for it)."""
        self.manager.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                                             data=self.ocp.args.JsonSave(data_state)))
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        target = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(target), data=self.ocp.args.JsonRestore()))
        return out.state, out.data

    def close(self):
        self.manager.close()


def export(system: system_lib.System, out_dir: str) -> str:
    """Writes the trainable parameters + config as a dd_jax model folder (no optimizer state).

    Sharded parameters are gathered to the host first; with several processes every process must call
    this (the gather is a collective) and process 0 writes the folder."""
    state = nnx.state(system.model, system.trainable())
    flat = to_host({".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)})
    out_dir = os.path.abspath(out_dir)
    meta = dict(model="decomposer", config=json.loads(system.config.to_json_best_effort()),
                dtype=str(next(iter(flat.values())).dtype), overwrite=True)
    if jax.process_index() != 0:
        return out_dir
    return store.write_flat(out_dir, flat, **meta)


def read_params(system: system_lib.System, path: str) -> None:
    """Sets the system's trainable parameters from a model folder (an export) or a run workdir's export."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, store.META_FILE)) and os.path.isdir(os.path.join(path, "export")):
        path = os.path.join(path, "export")
    if not os.path.isfile(os.path.join(path, store.META_FILE)):
        raise FileNotFoundError(f"{path}: not a trained model folder (no {store.META_FILE}) nor a run with an export")
    state = nnx.state(system.model, system.trainable())
    variables = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    missing = set(variables)
    for _, arrays in store.read_groups(path):
        for name, arr in arrays.items():
            if name not in variables:
                raise KeyError(f"{path}: parameter {name!r} is not in the model the config builds")
            if tuple(arr.shape) != tuple(variables[name].get_value().shape):
                raise ValueError(f"{path}: parameter {name!r} has shape {tuple(arr.shape)}, the model's is "
                                 f"{tuple(variables[name].get_value().shape)}")
            variables[name].set_value(jnp.asarray(arr, variables[name].get_value().dtype))
            missing.discard(name)
    if missing:
        raise KeyError(f"{path}: no value for {len(missing)} parameter(s), e.g. {sorted(missing)[0]!r}")
    nnx.update(system.model, state)


def load_trained(path: str, config=None, load_weights: bool = True) -> system_lib.System:
    """A trained system from an export folder, or a run workdir (its export, else newest checkpoint)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, store.META_FILE)):
        meta = store.read_meta(path)
        config = config or ml_collections.ConfigDict(meta["config"])
        system = system_lib.build(config, load_weights=load_weights)
        read_params(system, path)
        return system
    if os.path.isdir(os.path.join(path, "export")):
        return load_trained(os.path.join(path, "export"), config, load_weights)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: neither a trained model folder nor a training workdir")
    config = config or load_config(os.path.join(path, "config.json"))
    system = system_lib.build(config, load_weights=load_weights)
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), keep=1000)
    step = ckpts.latest()
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint yet")
    optimizer = _optimizer(system)
    state, _ = ckpts.restore(step, {"params": nnx.state(system.model, system.trainable()),
                                    "opt": nnx.state(optimizer, nnx.OptState)})
    nnx.update(system.model, state["params"])
    ckpts.close()
    return system


def _optimizer(system: system_lib.System) -> nnx.Optimizer:
    t = system.config.train
    return flow.make_optimizer(system.model, t.learning_rate, wrt=system.trainable(), weight_decay=t.weight_decay,
                               warmup_steps=t.warmup_steps, clip_norm=t.clip_norm,
                               decay_steps=t.steps if t.decay else None)


def make_step(system: system_lib.System, jit: bool = True) -> flow.TrainStep:
    """The training step this module runs (a `flow.TrainStep`; `.lower(...)` for AOT, memory plans, benchmarks)."""
    t = system.config.train
    return flow.make_train_step(system.spec, wrt=system.trainable(), guidance=system.guidance,
                                prepare=system.prepare, t_sampling=t.t_sampling, shift=t.t_shift, jit=jit,
                                loss=t.get("loss", "velocity"), **system.output_reading())


_make_step = make_step


def _preview_inputs(batch: dict, mesh) -> dict:
    """The first (up to) 4 examples of a global batch, replicated on the mesh (the same on every process)."""
    n = min(4, batch["composite"].shape[0])
    small = to_host({k: v[:n] for k, v in batch.items()})
    return sharding.shard_batch(small, mesh, replicate=lambda _: True)


def _preview(system, batch, key, steps, path, writer, step):
    """Image grid: composite | predicted layers | true layers (`batch`: replicated preview inputs).
    Every process samples (sharded collectives); process 0 writes the file and the TensorBoard image."""
    from PIL import Image

    pred = system_lib.decompose(system, batch["composite"], batch["task"], key, steps)
    cols = to_host([batch["composite"]] + [pred[name] for name in system.spec.targets]
                   + [batch[system_lib.LAYER_IMAGES[name]] for name in system.spec.targets])
    n = cols[0].shape[0]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(n)]
    grid = np.clip((np.concatenate(rows, axis=0) + 1) * 127.5, 0, 255).astype(np.uint8)
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
    if writer is not None:
        writer.add_image("preview", grid, step, dataformats="HWC")


def _tb_writer(workdir: str):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
        return None
    return SummaryWriter(os.path.join(workdir, "tb"))


def data_shards(config) -> int:
    """How many Grain shards the global batch is read from (`data.shards`; 0 = one per process)."""
    return int(config.data.get("shards", 0) or 0) or jax.process_count()


def check_batch(config, mesh) -> None:
    """The global batch splits evenly over the data shards, the processes and the mesh's batch axes."""
    b, n_proc, shards = int(config.data.batch_size), jax.process_count(), data_shards(config)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if shards % n_proc:
        raise ValueError(f"data.shards={shards} is not a multiple of the {n_proc} processes: each process reads "
                         f"the same number of shards")
    if b % shards:
        raise ValueError(f"data.batch_size={b} (global) is not divisible by the {shards} data shards "
                         f"({'data.shards' if config.data.get('shards', 0) else 'one per process'}): "
                         f"set --config.data.batch_size to a multiple of {shards}")
    if b % split:
        raise ValueError(f"data.batch_size={b} (global) cannot be split over the mesh's batch axes: data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {split} devices (mesh {dict(mesh.shape)}); "
                         f"use a batch that is a multiple of {split}, or put devices on the tensor axis "
                         f"(e.g. --config.mesh.tensor=... --config.mesh.fsdp=...)")


def text_source(config) -> tuple[str | None, str | None]:
    """(text cache, online encoders) for the input pipeline: the cache by default, `text.online` encodes."""
    t = config.text
    if t.kind != "precomputed":
        return None, None
    if t.get("online", False):
        encoders = t.get("encoders") or config.model.get("weights", "")
        if not encoders:
            raise ValueError("text.online needs text.encoders or model.weights (a converted pipeline folder "
                             "with t5/ and clip/)")
        return None, encoders
    return t.get("cache") or "auto", None


class ProcessData:
    """This process's share of every global batch: its `data.shards / process count` Grain shards (shard
    index = process index x that + i), batch `global / data.shards` each, concatenated. With a fixed
    `data.shards` the global batches do not depend on how many processes read them.

    Checkpointed state: {"shards": S, "iterator": state} -- every shard has consumed the same number of
    batches, so one Grain iterator state (a position) serves all of them on every process."""

    def __init__(self, config, worker_count: int | None = None):
        d = config.data
        worker_count = d.worker_count if worker_count is None else worker_count
        self.shards = data_shards(config)
        text_cache, text_encoders = text_source(config)
        per_process = self.shards // jax.process_count()
        self.indices = [jax.process_index() * per_process + i for i in range(per_process)]
        self.iterators = [iter(pipeline.make_pipeline(
            d.dir, d.tasks, "train", d.height, d.width, d.batch_size // self.shards, seed=d.seed,
            worker_count=worker_count, shard_index=i, shard_count=self.shards, crop=d.crop,
            text_cache=text_cache, text_encoders=text_encoders)) for i in self.indices]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        states = [it.get_state() for it in self.iterators]
        if len({json.dumps(st, sort_keys=True, default=str) for st in states}) > 1:
            raise RuntimeError(f"data shards {self.indices} are at different positions: {states}")
        return {"shards": self.shards, "iterator": states[0]}

    def set_state(self, state: dict) -> None:
        if "iterator" not in state:  # checkpoints written before data.shards: one shard per process
            state = {"shards": self.shards, "iterator": state}
        if int(state["shards"]) != self.shards:
            raise ValueError(f"the checkpoint was written reading {state['shards']} data shards, this run reads "
                             f"{self.shards} ({jax.process_count()} processes); resume with "
                             f"--config.data.shards={state['shards']} (a multiple of the process count)")
        for it in self.iterators:
            it.set_state(state["iterator"])


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) training; returns a summary. `stop_after` ends early (tests).

    Multi-process runs call `sharding.maybe_initialize_distributed` first (as `main` does)."""
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0:
        save_config(config, cfg_path)
    t = config.train
    mesh_cfg = config.get("mesh") or {}
    rules = mesh_cfg.get("rules") or None
    mesh = sharding.make_mesh(mesh_cfg)
    check_batch(config, mesh)
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)
    latest = ckpts.latest()
    with jax.set_mesh(mesh):
        # a converted base is read straight into its shards (never whole on one device)
        system = system_lib.build(config, shardings=lambda m: sharding.flat_shardings(m, mesh, rules))
        if t.get("init_from") and latest is None:
            read_params(system, t.init_from)
            print(f"starting from the parameters of {t.init_from}", file=sys.stderr)
        sharding.shard_model(system.model, mesh, rules)
        optimizer = _optimizer(system)
        sharding.shard_model(optimizer, mesh, rules)
    step_fn = make_step(system)
    data_it = ProcessData(config)
    start = 0

    def train_state():
        return {"params": nnx.state(system.model, system.trainable()), "opt": nnx.state(optimizer, nnx.OptState)}

    if latest is not None:
        state, data_state = ckpts.restore(latest, train_state())
        nnx.update(system.model, state["params"])
        nnx.update(optimizer, state["opt"])
        data_it.set_state(data_state)
        start = latest
        print(f"resumed from step {start} ({workdir})", file=sys.stderr)
    n_train = system_lib.count_params(system.model, system.trainable())
    print(f"training {n_train / 1e6:.2f}M parameters ({'LoRA' if config.lora.enabled else 'all'}) for "
          f"{t.steps} steps, batch {config.data.batch_size}, {config.data.height}x{config.data.width}, "
          f"tasks {config.data.tasks}; mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
          f"{data_it.shards} data shard(s)", file=sys.stderr)

    writer = _tb_writer(workdir)
    # previews: the first examples of the data stream (the same ones across resumes)
    preview_batch = _preview_inputs(device_batch(next(ProcessData(config, worker_count=0)), mesh, rules), mesh) \
        if t.preview_every else None
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    base_key = jax.random.key(t.seed)
    pending: list[tuple[int, jax.Array, jax.Array]] = []
    t_last, step_last = time.time(), start
    summary = {"start_step": start, "steps": t.steps}

    def flush(step: int) -> bool:
        """Writes the buffered per-step losses; False if any is not finite."""
        nonlocal t_last, step_last, pending
        if not pending:
            return True
        losses = [(s, float(l), float(g)) for s, l, g in pending]
        pending = []
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                for s, l, g in losses:
                    f.write(json.dumps({"step": s, "loss": l, "grad_norm": g}) + "\n")
        bad = [(s, l) for s, l, _ in losses if not math.isfinite(l)]
        if bad:
            raise NonFiniteLoss(f"loss is {bad[0][1]} at step {bad[0][0]}: stopping. The last good checkpoint "
                                f"(step {ckpts.latest()}) is kept in {workdir}/checkpoints; lower "
                                f"train.learning_rate or check the data.")
        now = time.time()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        lr = flow.learning_rate_at(step, t.learning_rate, t.warmup_steps, t.steps if t.decay else None)
        mean_loss = float(np.mean([l for _, l, _ in losses]))
        scalars = {"loss": mean_loss, "grad_norm": losses[-1][2], "lr": lr, "steps_per_sec": rate,
                   "examples_per_sec": rate * config.data.batch_size}
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        eta = (t.steps - step) / max(rate, 1e-9)
        print(f"step {step}/{t.steps}  loss {mean_loss:.4f}  grad_norm {losses[-1][2]:.3f}  lr {lr:.2e}  "
              f"{rate:.2f} steps/s  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr, flush=True)
        t_last, step_last = now, step
        summary["last_loss"] = mean_loss
        return True

    def save(step: int, wait: bool):
        flush(step)  # raises before saving if a loss went bad
        ckpts.save(step, train_state(), data_it.get_state(), wait=wait)

    # Stopping: stop_after is the same on every process, a signal reaches processes at different steps. With
    # several processes they agree on a signal (one allgather) only every `sync_every` steps, at multiples of it:
    # every process then checks at the same steps and stops at the same one.
    sync_every = max(1, int(t.get("sync_every", 10) or 1))
    step = start
    try:
        with _Stop() as stop:
            while step < t.steps:
                batch = device_batch(next(data_it), mesh, rules)
                with jax.set_mesh(mesh):
                    loss, gnorm = step_fn(system.model, optimizer, batch, jax.random.fold_in(base_key, step))
                step += 1
                pending.append((step, loss, gnorm))
                if len(pending) > 1:  # at most one step in flight: the step before is done, its memory back
                    pending[-2][1].block_until_ready()
                    hostmem.trim_if_grown()
                if step % t.log_every == 0:
                    flush(step)
                ending = step == t.steps or (stop_after is not None and step >= stop_after)
                if agrees_on_stop_at(step, sync_every):
                    ending = _any_process(ending or bool(stop.signal))
                if step % t.checkpoint_every == 0 or ending:
                    save(step, wait=ending)  # asynchronous unless the run ends here
                if t.preview_every and step % t.preview_every == 0:  # every process: the sampler is sharded
                    with jax.set_mesh(mesh):
                        _preview(system, preview_batch, jax.random.key(0), config.sample.steps,
                                 os.path.join(workdir, "previews", f"step_{step}.png"), writer, step)
                if ending and step < t.steps:
                    why = stop.signal or ("stop_after" if stop_after is not None and step >= stop_after
                                          else "another process's signal")
                    print(f"{why}: saved a checkpoint at step {step}; rerun the same command to resume",
                          file=sys.stderr)
                    summary["interrupted"] = why
                if ending:
                    break
    finally:
        ckpts.close()
        if writer is not None:
            writer.close()
    summary["step"] = step
    if step >= t.steps:
        summary["export"] = export(system, os.path.join(workdir, "export"))  # every process gathers, 0 writes
    return summary


def set_gpu_memory_fraction(config) -> str | None:
    """Exports `train.gpu_memory_fraction` as XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's GPU memory pool; its default
    is 0.75) unless the environment sets it; JAX reads it when it starts its GPU client, so call this first."""
    frac = float(config.train.get("gpu_memory_fraction", 0.0) or 0.0)
    if frac and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"train.gpu_memory_fraction={frac}: a fraction of GPU memory in (0, 1]")
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{frac:g}"
    return os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")


def main(argv):
    from absl import flags

    from absl import logging

    del argv
    FLAGS = flags.FLAGS
    set_gpu_memory_fraction(FLAGS.config)  # before JAX starts a GPU client
    sharding.maybe_initialize_distributed(FLAGS.config.get("distributed"))  # before any other JAX call
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        train(FLAGS.config, FLAGS.workdir)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/tiny.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); reruns resume from it")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    _define_flags()
    app.run(main)
