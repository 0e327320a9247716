"""Training: `python -m dd_jax.train --config configs/xray.py [--workdir DIR] [--config.train.steps=100]`.

Without --workdir the run lives in `$DD_JAX_HOME/runs/<config name>` (DD_JAX_HOME: ~/.cache/dd_jax), outside
any checkout, so that the same command resumes it in a later session.

One jitted flow-matching step per batch (ICD layout, loss on the noisy
layers: `flow.system_step`), AdamW on the trainable partition (LoRA
parameters, or everything when training from scratch). The workdir
(`dd_jax.checkpoints` owns its layout: configs, checkpoints, export) holds

    config.json, config.<step>.json   the config of the latest (re)run, and of every one (by start step)
    checkpoints/<step>/    orbax: trainable params + optimizer state, data iterator state
    export/                trainable params only, a dd_jax model folder (at the end)
    metrics.jsonl          every step's loss, and the logged scalars
    tb/                    TensorBoard event files (scalars, preview images)
    previews/step_N.png    composite | predicted layers | truth

Everything is validated before the workdir is touched (`validate`: the config
builds, the data exists, a rerun keeps the architecture); errors are one line,
exit status 2. A run resumes from the newest checkpoint that restores (newer
ones that do not are moved to skipped_checkpoints/, one line each).
SIGTERM/SIGINT save a checkpoint before exiting; a non-finite loss stops the
run with a message (exit 3) and keeps the last good checkpoint; a full disk
stops it with one line (exit 2), removing the partial checkpoint or export
and keeping what was written before.

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

import difflib
import errno
import json
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dd_jax import checkpoints, config as config_lib, flow, hostmem, optional, sharding, system as system_lib
from dd_jax.checkpoints import RunError, to_host
from dd_jax.models import store

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

    from jax.sharding import Mesh

    from dd_jax.sharding import Rules

ARRAY_KEYS = ("composite", "background", "foreground", "task", "txt", "vec")


class NonFiniteLoss(RuntimeError):
    pass


def input_pipeline() -> ModuleType:
    """`dd_jax.data.pipeline`, imported when a run starts: it needs Grain, which decomposition does not
    (a GPU host may lack it); RunError naming the package in one line when it is missing."""
    try:
        optional.require("grain", "training (python -m dd_jax.train)")
    except optional.MissingPackage as e:
        raise RunError(str(e)) from e
    from dd_jax.data import pipeline

    return pipeline


def device_batch(batch: dict, mesh: Mesh | None = None, rules: Rules | None = None) -> dict:
    """The model's inputs of a process-local numpy batch; with `mesh`, global arrays split over (data, fsdp)."""
    arrays = {k: v for k, v in batch.items() if k in ARRAY_KEYS}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return sharding.shard_batch(arrays, mesh, rules)


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


def make_step(system: system_lib.System, jit: bool = True) -> flow.TrainStep:
    """The training step this module runs (`flow.system_step`; `.lower(...)` for AOT, memory plans, benchmarks)."""
    return flow.system_step(system, jit=jit)


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
        SummaryWriter = optional.require("tensorboardX", "TensorBoard output").SummaryWriter
    except optional.MissingPackage as e:  # a GPU host may lack it: the run goes on, metrics.jsonl has everything
        print(f"{e}; writing metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(os.path.join(workdir, "tb"))


def data_shards(config: ml_collections.ConfigDict) -> int:
    """How many Grain shards the global batch is read from (`data.shards`; 0 = one per process)."""
    return int(config.data.shards) or jax.process_count()


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch splits evenly over the data shards, the processes and the mesh's batch axes."""
    b, n_proc, shards = int(config.data.batch_size), jax.process_count(), data_shards(config)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if shards % n_proc:
        raise ValueError(f"data.shards={shards} is not a multiple of the {n_proc} processes: each process reads "
                         f"the same number of shards")
    if b % shards:
        raise ValueError(f"data.batch_size={b} (global) is not divisible by the {shards} data shards "
                         f"({'data.shards' if config.data.shards else 'one per process'}): "
                         f"set --config.data.batch_size to a multiple of {shards}")
    if b % split:
        raise ValueError(f"data.batch_size={b} (global) cannot be split over the mesh's batch axes: data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {split} devices (mesh {dict(mesh.shape)}); "
                         f"use a batch that is a multiple of {split}, or put devices on the tensor axis "
                         f"(e.g. --config.mesh.tensor=... --config.mesh.fsdp=...)")


def text_source(config: ml_collections.ConfigDict) -> tuple[str | None, str | None]:
    """(text cache, online encoders) for the input pipeline: the cache by default, `text.online` encodes."""
    t = config.text
    if t.kind != "precomputed":
        return None, None
    if t.online:
        encoders = t.encoders or config.model.weights
        if not encoders:
            raise ValueError("text.online needs text.encoders or model.weights (a converted pipeline folder "
                             "with t5/ and clip/)")
        return None, encoders
    return t.cache or "auto", None


class ProcessData:
    """This process's share of every global batch: its `data.shards / process count` Grain shards (shard
    index = process index x that + i), batch `global / data.shards` each, concatenated. With a fixed
    `data.shards` the global batches do not depend on how many processes read them.

    Checkpointed state: {"shards": S, "iterator": state} -- every shard has consumed the same number of
    batches, so one Grain iterator state (a position) serves all of them on every process."""

    def __init__(self, config: ml_collections.ConfigDict, worker_count: int | None = None):
        d = config.data
        worker_count = d.worker_count if worker_count is None else worker_count
        self.shards = data_shards(config)
        text_cache, text_encoders = text_source(config)
        per_process = self.shards // jax.process_count()
        pipeline = input_pipeline()
        self.indices = [jax.process_index() * per_process + i for i in range(per_process)]
        self.iterators = [iter(pipeline.make_pipeline(
            d.dir, d.tasks, "train", d.height, d.width, d.batch_size // self.shards, seed=d.seed,
            worker_count=worker_count, shard_index=i, shard_count=self.shards, crop=d.crop,
            text_cache=text_cache, text_encoders=text_encoders, source=d.source, style=d.style,
            examples=d.examples, text_quantize=config.model.quantize))
            for i in self.indices]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Stops the iterators' worker processes and frees their shared memory (Grain's multiprocess
        prefetch warns of leaked shared_memory objects at exit otherwise)."""
        for it in self.iterators:
            if hasattr(it, "close"):
                it.close()

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


def _end_partial_line(path: str) -> None:
    """Ends a last line a killed run left unfinished, so lines appended after it stay whole."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def check_data(config: ml_collections.ConfigDict) -> None:
    """The data the run reads exists: every task of `data.tasks` built under `data.dir`, with examples in its
    train split (read from dataset_info.json: nothing imported, nothing opened). RunError otherwise."""
    d = config.data
    pipeline = input_pipeline()
    if d.source not in pipeline.SOURCES:
        raise RunError(f"data.source={d.source!r}; choose from {', '.join(pipeline.SOURCES)}")
    if d.source == "procedural":  # nothing on disk: the tasks and the style must name what the synthesizer makes
        try:
            pipeline.procedural.ProceduralSource(pipeline.resolve_tasks(d.dir, d.tasks, d.source), 16, 16,
                                                 style=d.style)
        except ValueError as e:
            raise RunError(f"data.tasks={d.tasks!r}, data.style={d.style!r}: {e}") from e
        return
    if not d.dir or not os.path.isdir(d.dir):
        raise RunError(f"data.dir {d.dir!r}: no such folder; build the data first (python -m dd_jax.data.build "
                       f"--out DIR) and pass --config.data.dir=DIR")
    tasks = pipeline.resolve_tasks(d.dir, d.tasks)
    if not tasks:
        raise RunError(f"data.dir {d.dir!r} holds no dataset (data.tasks={d.tasks!r}); build one with "
                       f"python -m dd_jax.data.build --out {d.dir}")
    for task in tasks:
        try:
            version_dir, _ = pipeline.find_dataset_dir(d.dir, task)
        except (FileNotFoundError, ValueError) as e:
            raise RunError(f"data.dir {d.dir!r}: {e}") from e
        try:
            with open(os.path.join(version_dir, "dataset_info.json")) as f:
                splits = {s.get("name"): s for s in json.load(f).get("splits", [])}
        except (OSError, ValueError, AttributeError) as e:
            raise RunError(f"{version_dir}/dataset_info.json: unreadable ({e}); rebuild the dataset") from e
        n = sum(int(x) for x in splits.get("train", {}).get("shardLengths", []))
        if n == 0:
            raise RunError(f"{version_dir}: the dataset for {task!r} has no train examples; rebuild it with "
                           f"--train N")


def check_config(config: ml_collections.ConfigDict) -> None:
    """The config builds a model: every part made abstractly (`nnx.eval_shape`: nothing allocated, no
    weights read) with its optimizer; the weight paths it names exist. RunError naming what is wrong."""
    t = config.train
    if int(t.steps) < 1:
        raise RunError(f"train.steps={t.steps}: a run trains at least one step (an untrained model is not "
                       f"exported)")
    if int(t.checkpoint_every) < 1 or int(t.log_every) < 1:
        raise RunError("train.checkpoint_every and train.log_every must be >= 1")
    try:
        checkpoint, ae_path = system_lib.weight_paths(config)
        for field, path in (("model.checkpoint", checkpoint), ("autoencoder.path", ae_path)):
            if path and not os.path.isdir(path):
                raise FileNotFoundError(f"{field} {path!r}: no such folder")
        if t.init_from and not os.path.isdir(t.init_from):
            raise FileNotFoundError(f"train.init_from {t.init_from!r}: no such model folder or run")
        if t.init_from:
            checkpoints.resolve_init_from(t.init_from, config)

        def init():
            model = system_lib.build_model(config, load_weights=False)
            return model, flow.system_optimizer(system_lib.wrap(model, config))

        nnx.eval_shape(init)
    except RunError:
        raise
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise RunError(f"the config does not build a model: {checkpoints.one_line(e)}") from e


def validate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> None:
    """Everything checked before the run directory is touched: a rerun keeps the run's architecture, the
    config builds (`check_config`), the batch splits over the mesh, the data exists."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunError(f"--workdir {workdir}: not a folder")
    checkpoints.check_rerun(workdir, config)
    try:  # the run writes its export there at the end (or at train.max_minutes): refused now, not after the steps
        store.check_replaceable(os.path.join(workdir, checkpoints.EXPORT), overwrite=True)
    except FileExistsError as e:
        raise RunError(f"{e} (it is where this run exports its model)") from e
    check_config(config)
    try:
        check_batch(config, mesh)
    except ValueError as e:
        raise RunError(str(e)) from e
    check_data(config)


class DiskFull(RunError):
    """A write failed for lack of space; what was written before is kept."""


def _disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def process_start_time() -> float:
    """When this process started (seconds since the epoch): `train.max_minutes` counts from there, so the
    budget covers imports, building the model and compiling, not only the steps."""
    import psutil

    return psutil.Process().create_time()


class Budget:
    """`train.max_minutes`: whether to stop now so that one more step, a checkpoint and the export still end
    before the deadline. What they take is measured as the run goes (a step: the time between steps, most
    recent weighted most; a save: the last synchronous one), starting from `SAVE_GUESS` seconds per save."""

    SAVE_GUESS = 15.0

    def __init__(self, minutes: float, start: float | None = None):
        minutes = float(minutes or 0.0)
        if minutes < 0 or not math.isfinite(minutes):
            raise RunError(f"train.max_minutes={minutes}: minutes from the process's start (0 = no budget)")
        start = process_start_time() if start is None else start
        self.deadline = start + 60.0 * minutes if minutes else None
        self.step_seconds, self.save_seconds = 0.0, self.SAVE_GUESS

    def note_step(self, seconds: float) -> None:
        self.step_seconds = seconds if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * seconds

    def note_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def spent(self, now: float | None = None) -> bool:
        """True when the time left is less than a step, a checkpoint and an export (twice over, as margin)."""
        if self.deadline is None:
            return False
        reserve = 2.0 * (self.step_seconds + 2.0 * self.save_seconds)
        return (time.time() if now is None else now) + reserve >= self.deadline


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) training; returns a summary. `stop_after` ends early (tests).

    Nothing in `workdir` is touched before the config is validated (`validate`). A resume restores the
    newest checkpoint that restores (newer ones that do not are moved to skipped_checkpoints/, one line
    each); the config it runs with is kept as config.<start step>.json and becomes config.json.

    Multi-process runs call `sharding.maybe_initialize_distributed` first (as `main` does)."""
    run = Run(config, workdir)
    step = run.loop(stop_after)
    return run.finish(step)


class Run:
    """One (re)run of training in a workdir, in the stages `train` calls: made (validated, built, restored),
    `loop` (the steps, with their logs and checkpoints), `finish` (the export)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, t = config, workdir, config.train
        self.budget = Budget(t.max_minutes)
        self.rules = config.mesh.rules or None
        self.mesh = sharding.make_mesh(config.mesh)
        validate(config, workdir, self.mesh)
        os.makedirs(workdir, exist_ok=True)
        self.ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINTS)
        self.ckpts = checkpoints.Checkpoints(self.ckpt_dir, t.keep_checkpoints)
        self._build(fresh=not self.ckpts.steps())
        self.step_fn = make_step(self.system)
        self.data = ProcessData(config)
        self.start = self._restore()
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        if jax.process_index() == 0:
            checkpoints.record_config(workdir, config, self.start)
            _end_partial_line(self.metrics_path)
        n_train = system_lib.count_params(self.system.model, self.system.trainable())
        print(f"training {n_train / 1e6:.2f}M parameters ({'LoRA' if config.lora.enabled else 'all'}) for "
              f"{t.steps} steps, batch {config.data.batch_size}, {config.data.height}x{config.data.width}, "
              f"tasks {config.data.tasks}; mesh {dict(self.mesh.shape)} over {jax.process_count()} process(es), "
              f"{self.data.shards} data shard(s)", file=sys.stderr)
        self.pending: list[tuple[int, jax.Array, jax.Array]] = []  # (step, loss, gradient norm) not yet logged
        self.t_last, self.step_last = time.time(), self.start
        self.in_flight = None  # the step of an asynchronous save whose files may still be being written
        self.summary = {"start_step": self.start, "steps": t.steps}

    def _build(self, fresh: bool) -> None:
        """The system (a converted base read straight into its shards, never whole on one device; a fresh run
        starts from `train.init_from`) and its optimizer, placed on the mesh."""
        t, mesh, rules = self.config.train, self.mesh, self.rules
        with jax.set_mesh(mesh):
            self.system = system_lib.build(self.config, shardings=lambda m: sharding.flat_shardings(m, mesh, rules))
            if t.init_from and fresh:
                checkpoints.read_params(self.system, t.init_from)
                print(f"starting from the parameters of {t.init_from}", file=sys.stderr)
            sharding.shard_model(self.system.model, mesh, rules)
            self.optimizer = flow.system_optimizer(self.system)
            sharding.shard_model(self.optimizer, mesh, rules)

    def train_state(self) -> dict:
        return checkpoints.train_state(self.system, self.optimizer)

    def _restore(self) -> int:
        """The newest checkpoint that restores, into the model, optimizer and data; its step (0: none).
        Newer ones that do not restore are set aside (never deleted): the run saves those steps again."""
        latest, state, data_state, skipped = self.ckpts.restore_newest(self.train_state())
        if skipped:
            self.ckpts.close()
            if jax.process_index() == 0:
                checkpoints.move_aside(self.workdir, [s for s, _ in skipped])
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("dd_jax.train: skipped checkpoints moved")
            self.ckpts = checkpoints.Checkpoints(self.ckpt_dir, self.config.train.keep_checkpoints)
        if latest is None:
            return 0
        nnx.update(self.system.model, state["params"])
        nnx.update(self.optimizer, state["opt"])
        self.data.set_state(data_state)
        print(f"resumed from step {latest} ({self.workdir})", file=sys.stderr)
        return latest

    # ------------------------------------------------------------------ logging and saving
    def flush(self, step: int) -> None:
        """Writes the buffered per-step losses and prints the line of `step`; NonFiniteLoss if any is not finite."""
        if not self.pending:
            return
        t = self.config.train
        losses = [(s, float(loss), float(g)) for s, loss, g in self.pending]
        self.pending = []
        if jax.process_index() == 0:
            with open(self.metrics_path, "a") as f:
                for s, loss, g in losses:
                    f.write(json.dumps({"step": s, "loss": loss, "grad_norm": g}) + "\n")
        # a finite loss with a non-finite gradient norm has already written NaN into the parameters (the
        # update of that step): the checkpoint of that step must not be saved either
        bad = [(s, what, v) for s, loss, g in losses for what, v in (("loss", loss), ("gradient norm", g))
               if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"{bad[0][1]} is {bad[0][2]} at step {bad[0][0]}: stopping. The last good checkpoint "
                                f"(step {self.ckpts.latest()}) is kept in {self.workdir}/checkpoints; lower "
                                f"train.learning_rate or check the data.")
        now = time.time()
        rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
        lr = flow.learning_rate_at(step, t.learning_rate, t.warmup_steps, t.steps if t.decay else None)
        mean_loss = float(np.mean([loss for _, loss, _ in losses]))
        scalars = {"loss": mean_loss, "grad_norm": losses[-1][2], "lr": lr, "steps_per_sec": rate,
                   "examples_per_sec": rate * self.config.data.batch_size}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        eta = (t.steps - step) / max(rate, 1e-9)
        print(f"step {step}/{t.steps}  loss {mean_loss:.4f}  grad_norm {losses[-1][2]:.3f}  lr {lr:.2e}  "
              f"{rate:.2f} steps/s  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr, flush=True)
        self.t_last, self.step_last = now, step
        self.summary["last_loss"] = mean_loss

    def save_failed(self, e: BaseException, step: int) -> BaseException:
        """A clear error for a save that ran out of space (its partial files removed); else `e` itself."""
        if not _disk_full(e):
            return e
        try:
            self.ckpts.close()  # waits for orbax's background writes, which fail too
        except Exception:  # noqa: BLE001
            pass
        self.ckpts.remove_partial(settle=5.0)
        ckpt_dir = self.ckpt_dir
        done = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
        kept = f"the checkpoint of step {max(done)}" if done else "no checkpoint"
        return DiskFull(f"no space left on device while saving the checkpoint of step {step} in {ckpt_dir}: it is "
                        f"not saved and its partial files are removed; {kept} and metrics.jsonl are kept. Free "
                        f"space and rerun the same command to resume")

    def save(self, step: int, wait: bool) -> None:
        """A checkpoint of `step` (after its losses are logged: a bad one raises first); asynchronous unless
        `wait`. An earlier asynchronous save's failure surfaces here."""
        self.flush(step)
        t0 = time.time()
        try:
            self.ckpts.save(step, self.train_state(), self.data.get_state(), wait=wait)
        except Exception as e:
            raise self.save_failed(e, self.in_flight or step) from e
        if wait:
            self.budget.note_save(time.time() - t0)
        self.in_flight = None if wait else step

    def close(self, step: int, failed: bool) -> None:
        """Waits for the last save (of `step`, or the asynchronous one in flight). After a failure orbax may
        fail again here: the first error is the one reported."""
        try:
            self.ckpts.close()
        except Exception as e:
            if not failed:
                raise self.save_failed(e, self.in_flight or step) from e

    # ------------------------------------------------------------------ the steps
    def loop(self, stop_after: int | None = None) -> int:
        """Trains up to train.steps, or until a signal, `stop_after` or the budget ends the run with a
        checkpoint (recorded in `summary["interrupted"]`); the step reached."""
        self.writer = _tb_writer(self.workdir)
        # previews: the first examples of the data stream (the same ones across resumes)
        self.preview_batch = None
        if self.config.train.preview_every:
            first = ProcessData(self.config, worker_count=0)
            self.preview_batch = _preview_inputs(device_batch(next(first), self.mesh, self.rules), self.mesh)
            first.close()
        self.step = self.start
        try:
            with _Stop() as stop:
                self._steps(stop, stop_after)
        except BaseException:
            self.close(self.step, failed=True)
            raise
        else:
            self.close(self.step, failed=False)
        finally:
            self.data.close()
            if self.writer is not None:
                self.writer.close()
        return self.step

    def _steps(self, stop: _Stop, stop_after: int | None) -> None:
        # Stopping: stop_after is the same on every process, a signal reaches processes at different steps. With
        # several processes they agree on a signal (one allgather) only every `sync_every` steps, at multiples of
        # it: every process then checks at the same steps and stops at the same one.
        t, mesh = self.config.train, self.mesh
        sync_every = max(1, int(t.sync_every or 1))
        base_key = jax.random.key(t.seed)
        step, t_step = self.start, time.time()
        while step < t.steps:
            batch = device_batch(next(self.data), mesh, self.rules)
            with jax.set_mesh(mesh):
                loss, gnorm = self.step_fn(self.system.model, self.optimizer, batch, jax.random.fold_in(base_key, step))
            step = self.step = step + 1
            self.pending.append((step, loss, gnorm))
            if len(self.pending) > 1:  # at most one step in flight: the step before is done, its memory back
                self.pending[-2][1].block_until_ready()
                hostmem.trim_if_grown()
            if step % t.log_every == 0:
                self.flush(step)
            now = time.time()
            if step > self.start + 1:  # the first step's time is mostly compilation
                self.budget.note_step(now - t_step)
            t_step = now
            out_of_time = self.budget.spent(now)
            ending = step == t.steps or (stop_after is not None and step >= stop_after)
            if agrees_on_stop_at(step, sync_every):
                ending = _any_process(ending or bool(stop.signal) or out_of_time)
                out_of_time = _any_process(out_of_time)
            if step % t.checkpoint_every == 0 or ending:
                self.save(step, wait=ending)  # asynchronous unless the run ends here
            if t.preview_every and step % t.preview_every == 0:  # every process: the sampler is sharded
                with jax.set_mesh(mesh):
                    _preview(self.system, self.preview_batch, jax.random.key(0), self.config.sample.steps,
                             os.path.join(self.workdir, "previews", f"step_{step}.png"), self.writer, step)
            if ending and step < t.steps:
                why = stop.signal or ("stop_after" if stop_after is not None and step >= stop_after
                                      else "max_minutes" if out_of_time else "another process's signal")
                print(f"{why}: saved a checkpoint at step {step}{' and exporting it' if why == 'max_minutes' else ''}"
                      f"; rerun the same command to resume", file=sys.stderr)
                self.summary["interrupted"] = why
            if ending:
                break

    # ------------------------------------------------------------------ the end
    def finish(self, step: int) -> dict:
        """Exports the model at the last step, or where the budget stopped the run (a budgeted run always
        leaves a model); the summary."""
        self.summary["step"] = step
        if step < self.config.train.steps and self.summary.get("interrupted") != "max_minutes":
            return self.summary
        export_dir = os.path.join(self.workdir, checkpoints.EXPORT)
        try:  # every process gathers, 0 writes
            self.summary["export"] = checkpoints.export(self.system, export_dir, step)
        except Exception as e:
            if not _disk_full(e):
                raise
            raise DiskFull(f"no space left on device while writing {export_dir}: the new export is not written "
                           f"(its partial folder is removed; an earlier export stays as it was); the checkpoint of "
                           f"step {step} is kept. Free space and rerun the same command to export") from e
        return self.summary


def set_gpu_memory_fraction(config: ml_collections.ConfigDict) -> str | None:
    """Exports `train.gpu_memory_fraction` as XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's GPU memory pool; its default
    is 0.75) unless the environment sets it; JAX reads it when it starts its GPU client, so call this first."""
    frac = float(config.train.gpu_memory_fraction or 0.0)
    if frac and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"train.gpu_memory_fraction={frac}: a fraction of GPU memory in (0, 1]")
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{frac:g}"
    return os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    del argv
    FLAGS = flags.FLAGS
    try:  # --config (and its overrides) over configs/base.py: a field base lacks is an error naming it
        config = config_lib.merge(FLAGS.config, FLAGS["config"].config_filename)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    set_gpu_memory_fraction(config)  # before JAX starts a GPU client
    sharding.maybe_initialize_distributed(config.distributed)  # before any other JAX call
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    logging.get_absl_logger().addFilter(_no_orbax_tracebacks)  # a failed save: orbax's lines, our one error
    workdir = FLAGS.workdir or checkpoints.default_workdir(FLAGS["config"].config_filename)
    if not FLAGS.workdir:
        print(f"workdir: {workdir} (rerun the same command to resume it)", file=sys.stderr)
    try:
        train(config, workdir)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except RunError as e:  # a config, data dir or run that cannot be used; a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _no_orbax_tracebacks(record) -> bool:
    """Keeps orbax's error records to their message line (their tracebacks run to a hundred lines; the
    error that stops the run is reported once, in one line, by `main`)."""
    if "orbax" in (record.pathname or ""):
        record.exc_info, record.exc_text = None, None
    return True


def check_config_args(argv: Sequence[str]) -> str | None:
    """What is wrong with `--config` and its `--config.FIELD=` overrides, in one line (None: nothing): a missing
    file (with close names), a file that does not load (syntax error, get_config failing or missing), an
    override naming a field the config lacks (with the close ones). absl would report these as tracebacks or
    garbled lines."""
    from dd_jax import cli

    args = list(argv[1:])
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if path is None and "--config" in args[:-1]:
        path = args[args.index("--config") + 1]
    if not path:
        return None
    file = path if os.path.isfile(path) or ":" not in path else path.rsplit(":", 1)[0]
    if not os.path.isfile(file):
        return cli.not_found(file, "--config")
    try:
        config = config_lib.load_config_file(path)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported, not raised
        return str(e) if isinstance(e, config_lib.ConfigError) else f"--config {path}: {checkpoints.one_line(e)}"
    for arg in (a.split("=", 1)[0] for a in args if a.startswith("--config.")):
        node, walked = config, []
        for key in arg[len("--config."):].split("."):
            if ".".join(walked) in config_lib.FREE:
                break
            if ".".join(walked + [key]) in config_lib.REMOVED:
                return f"{arg}: the field was removed: {config_lib.REMOVED['.'.join(walked + [key])]}"
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                near = difflib.get_close_matches(key, list(node.keys()) if isinstance(
                    node, ml_collections.ConfigDict) else [], n=2)
                hint = f"; did you mean {' or '.join('.'.join(walked + [n]) for n in near)}?" if near else ""
                return (f"{arg}: the config has no field {'.'.join(walked + [key])!r}{hint} (configs/base.py lists "
                        f"the fields)")
            node, walked = node[key], walked + [key]
    return None


def _parse_flags(argv):
    """absl's parser with one-line errors and exit status 2: a bad flag or value, a missing required flag, a
    config that does not load or an override naming a field the config lacks (`check_config_args`)."""
    from absl import flags

    problem = check_config_args(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config does not have
        missing = str(e).strip("\"'").split("'")[0]
        args = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [a for a in args if a.split(".")[-1] == missing or f".{missing}." in a] or args
        print(f"error: {', '.join(named) if named else missing}: the config has no field {missing!r} "
              f"(see configs/base.py for the fields)", file=sys.stderr)
        sys.exit(2)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/tiny.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); reruns resume from it. Default: "
                        "$DD_JAX_HOME/runs/<config name>, DD_JAX_HOME defaulting to ~/.cache/dd_jax")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from absl import app

    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
