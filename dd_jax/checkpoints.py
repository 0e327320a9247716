"""Run directories and model folders: the one module that reads and writes them.

A run directory (a training workdir) is an append-only history:

    config.json            the config of the latest (re)run, written only once it was validated
    config.<step>.json     every config a (re)run started with, named by the step it started from
    checkpoints/<step>/    orbax: trainable params + optimizer state, data iterator state
    skipped_checkpoints/   checkpoints that no longer restore, moved aside by a resume (kept, never deleted)
    export/                the trainable params as a model folder, with the step they were trained to
    metrics.jsonl, tb/, previews/   written by `dd_jax.train`

A rerun may change how the run trains (steps, learning rate, data, ...) but not the architecture
(`ARCHITECTURE`: the fields that shape the parameters or what they compute); `check_rerun` refuses that
naming the fields, before anything in the run is touched.

A model folder is `dd_jax.models.store`'s format (`dd_jax_model.json`: format, config, step; `groups/`).

`load_trained(path)` takes either. Of a run it loads the newest trained weights: its newest checkpoint
that restores or its export, whichever holds the later step; a checkpoint that does not restore is
skipped with a line saying why, and the line it prints names what was loaded (path and step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dd_jax import config as config_lib, flow, system as system_lib
from dd_jax.models import store

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_checkpoints"
EXPORT = "export"
# The shipped model: what decompose, evaluate and the task-head fitting use without --checkpoint.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")

# Config fields a rerun of a run may not change: they shape the parameters (a checkpoint would not restore)
# or change what the trained parameters compute. Everything else (paths to the same weights, attention
# kernels, remat, compute dtype, steps, data, learning rate, ...) may change between (re)runs.
ARCHITECTURE = ("model.preset", "model.params", "model.param_dtype", "model.scan_layers", "lora",
                "autoencoder.kind", "autoencoder.preset", "autoencoder.factor", "text.kind", "text.length", "icd",
                "train.prediction", "train.residual")


class RunError(ValueError):
    """A run directory, model folder or config that cannot be used; the message is one line naming it."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one short line (TensorStore and orbax errors run to many lines)."""
    text = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------ configs
def config_dict(config: config_lib.ConfigLike) -> dict:
    """A config as plain JSON data (tuples as lists), as it is saved."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return json.loads(config.to_json_best_effort())


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_config(config: config_lib.ConfigLike, path: str) -> None:
    """Writes a config as JSON under a temporary name, then renames it into place."""
    _write_atomic(path, config.to_json_best_effort(indent=1) if not isinstance(config, dict)
                  else json.dumps(config, indent=1))


def load_config(path: str) -> ml_collections.ConfigDict:
    """A run's saved config, merged over configs/base.py (`dd_jax.config.load_json`); RunError (one line) if
    it is not a config or names a field base does not have."""
    try:
        return config_lib.load_json(path)
    except config_lib.ConfigError as e:
        raise RunError(str(e)) from e


def model_config(path: str, meta: dict) -> ml_collections.ConfigDict:
    """The config saved in a model folder's metadata (`read_model_meta`), merged over configs/base.py."""
    try:
        return config_lib.merge(meta["config"], os.path.join(path, store.META_FILE), saved=True)
    except config_lib.ConfigError as e:
        raise RunError(str(e)) from e


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def architecture_changes(old: config_lib.ConfigLike, new: config_lib.ConfigLike) -> list[str]:
    """The `ARCHITECTURE` fields whose values differ between two configs (fields one of them lacks, e.g. a
    config saved before the field existed, are not compared)."""
    a, b = _flat(config_dict(old)), _flat(config_dict(new))
    arch = lambda k: any(k == f or k.startswith(f + ".") for f in ARCHITECTURE)
    changed = [k for k in sorted(set(a) | set(b)) if arch(k) and k in a and k in b and a[k] != b[k]]
    # a field present on one side only under model.params changes the architecture (a preset override)
    changed += [k for k in sorted(set(a) ^ set(b)) if k.startswith("model.params.")]
    return sorted(changed)


def check_same_architecture(saved: config_lib.ConfigLike, config: config_lib.ConfigLike, model: str,
                            given: str = "the config given") -> None:
    """Raises RunError (one line naming the differing `ARCHITECTURE` fields) if `config` describes another model
    than the one `saved` (the config `model` was trained with) does: its parameters would not fit, and building
    it (a 12B flux-dev for a 64 px model) could run out of memory before any error. Checked before building."""
    changed = architecture_changes(saved, config)
    if not changed:
        return
    a, b = _flat(config_dict(saved)), _flat(config_dict(config))
    # the fields that say the most first (the preset), the model.params fields it implies last
    changed.sort(key=lambda k: (k != "model.preset", k.startswith("model.params."), k))
    shown = ", ".join(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in changed[:3])
    rest = f"; also {', '.join(changed[3:])}" if len(changed) > 3 else ""
    raise RunError(f"{given} describes another model than {model} was trained as ({len(changed)} architecture "
                   f"field(s) differ: {shown}{rest}); leave out --config to use the model's own, or pass a config "
                   f"with the same architecture")


def optimizer_layout(config: config_lib.ConfigLike) -> dict[str, bool]:
    """What shapes the optimizer state a checkpoint holds (`flow.make_optimizer`): a clipping stage, and a
    learning-rate schedule (whose step count is state) rather than a constant. Values of these fields may
    change on a rerun; switching one of them on or off may not (no checkpoint would restore)."""
    t = config_dict(config)["train"]
    return {"train.clip_norm set": bool(t.get("clip_norm")),
            "train.warmup_steps > 0 or train.decay": bool(t.get("warmup_steps") or t.get("decay"))}


def check_rerun(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises RunError if `workdir` holds a run whose architecture `config` changes, or the layout of its
    optimizer state (`optimizer_layout`), or an unreadable one."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    old = load_config(path)
    changed = architecture_changes(old, config)
    if changed:
        a, b = _flat(config_dict(old)), _flat(config_dict(config))
        diff = ", ".join(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in changed)
        raise RunError(f"{workdir} was trained with another architecture ({diff}); a rerun may change how it "
                       f"trains, not the model: start a new --workdir")
    was, now = optimizer_layout(old), optimizer_layout(config)
    flipped = [f"{k}: {was[k]} -> {now[k]}" for k in was if was[k] != now[k]]
    if flipped:
        raise RunError(f"{workdir}: this rerun changes the layout of the optimizer state ({', '.join(flipped)}), "
                       f"so none of its checkpoints could restore; keep those settings, or start a new --workdir "
                       f"with --config.train.init_from={workdir}")


def resolve_init_from(path: str, config: config_lib.ConfigLike) -> str:
    """The model folder `train.init_from` names (a model folder, or a run with an export), checked against
    the config before any work: RunError (one line) if it is neither, or was trained with another
    architecture (its parameters would not fit)."""
    folder = path if has_model_meta(path) else os.path.join(path, EXPORT)
    if not has_model_meta(folder):
        raise RunError(f"train.init_from {path!r}: not a trained model folder (no {store.META_FILE}) nor a run "
                       f"with an {EXPORT}/ (train it to the end, or name its export)")
    meta = read_model_meta(folder)
    changed = architecture_changes(meta["config"], config)
    if changed:
        raise RunError(f"train.init_from {path!r} was trained with another architecture ({', '.join(changed)} "
                       f"differ): its parameters do not fit this model")
    return folder


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> str:
    """Keeps the config a (re)run starts with as `config.<step>.json` (never replacing an earlier one:
    `config.<step>.<n>.json` if that name is taken by another config) and makes it `config.json`."""
    text = config.to_json_best_effort(indent=1)
    name = os.path.join(workdir, f"config.{step}.json")
    n = 1
    while os.path.exists(name):
        with open(name) as f:
            if f.read() == text:
                break
        name = os.path.join(workdir, f"config.{step}.{n}.json")
        n += 1
    else:
        _write_atomic(name, text)
    _write_atomic(os.path.join(workdir, CONFIG_FILE), text)
    return name


# ------------------------------------------------------------------ host copies
def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, multi-process) arrays; every process must call it (a collective
    when some array spans other processes' devices)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)


# ------------------------------------------------------------------ checkpoints
def _is_partial(name: str) -> bool:
    return ".orbax-checkpoint-tmp" in name


class Checkpoints:
    """Orbax CheckpointManager over (trainable state, optimizer state, data iterator state).

    `read_only` opens a run's checkpoints for reading (decompose, evaluate): nothing is created or
    cleaned. Otherwise the temporary folders of saves a killed or failed run left behind are removed."""

    def __init__(self, directory: str, keep: int = 1000, read_only: bool = False):
        import orbax.checkpoint as ocp  # slow to import: only when a run's checkpoints are opened

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        if not read_only:
            self.remove_partial()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        """Committed checkpoints, newest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(self.manager.all_steps(), reverse=True)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def partial(self) -> list[str]:
        """Temporary folders of saves that never completed."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory) if _is_partial(n))

    def remove_partial(self, settle: float = 0.0) -> list[str]:
        """Removes what `partial` lists (only orbax's temporary names, never a committed checkpoint). After a
        failed save orbax's background threads may still write into its folder after `close`: with `settle`
        the removal is repeated until the folder stays gone for a moment (at most `settle` seconds)."""
        gone, deadline, quiet = [], time.monotonic() + settle, 0
        while True:
            found = self.partial()
            for p in found:
                shutil.rmtree(p, ignore_errors=True)
            gone += [p for p in found if p not in gone]
            quiet = quiet + 1 if not found else 0
            if time.monotonic() >= deadline or quiet >= 3:
                return gone
            time.sleep(0.1)

    def save(self, step: int, state: Any, data_state: dict, wait: bool = True) -> None:
        """Saves; `wait=False` returns once the arrays are copied to the host (orbax's blocking part: with no
        device-to-host byte limit every array is transferred before `save` returns, so the next step may
        donate them) and writes the files in the background (the next save or `close` waits for it)."""
        self.manager.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                                             data=self.ocp.args.JsonSave(data_state)))
        if wait:
            self.manager.wait_until_finished()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
        """(state, data state) of a step; `abstract_state` sets shapes, dtypes and shardings, without it the
        arrays come back as saved."""
        if abstract_state is None:
            out = self.manager.restore(step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(), data=self.ocp.args.JsonRestore()))
        else:
            target = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, abstract_state)
            out = self.manager.restore(step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(target), data=self.ocp.args.JsonRestore()))
        return out.state, out.data

    def restore_newest(self, abstract_state: Any = None, log: Callable[[str], None] = _log
                       ) -> tuple[int | None, Any, dict | None, list[tuple[int, str]]]:
        """(step, state, data state, skipped) of the newest checkpoint that restores; (None, None, None, [])
        without checkpoints. `skipped`: [(step, reason)] of the newer ones that did not restore, each said in
        one line. RunError if none restores."""
        skipped = []
        for step in self.steps():
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint: try the one before
                skipped.append((step, one_line(e)))
                log(f"skipping checkpoint {self.path(step)}: it does not restore ({one_line(e)})")
                continue
            return step, state, data, skipped
        if skipped:
            raise RunError(f"no checkpoint in {self.directory} restores (" + "; ".join(
                f"step {s}: {r}" for s, r in skipped) + ")")
        return None, None, None, []

    def close(self) -> None:
        self.manager.close()


def move_aside(workdir: str, steps: Iterable[int], log: Callable[[str], None] = _log) -> list[str]:
    """Moves checkpoints that do not restore out of `checkpoints/` into `skipped_checkpoints/` (kept for
    inspection; the run then saves those steps anew). Returns the new paths."""
    out = []
    for step in steps:
        src = os.path.join(workdir, CHECKPOINTS, str(step))
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(workdir, SKIPPED), exist_ok=True)
        dest, n = os.path.join(workdir, SKIPPED, str(step)), 1
        while os.path.lexists(dest):
            dest, n = os.path.join(workdir, SKIPPED, f"{step}.{n}"), n + 1
        os.rename(src, dest)
        log(f"moved the checkpoint that does not restore to {dest}")
        out.append(dest)
    return out


def train_state(system: system_lib.System, optimizer: nnx.Optimizer) -> dict:
    """What a checkpoint holds of the model: the trainable parameters and the optimizer state."""
    return {"params": nnx.state(system.model, system.trainable()), "opt": nnx.state(optimizer, nnx.OptState)}


# ------------------------------------------------------------------ model folders
def export(system: system_lib.System, out_dir: str, step: int | None = None) -> str:
    """Writes the trainable parameters + config (+ the step they were trained to) as a dd_jax model folder
    (no optimizer state); replaces an earlier export of the run.

    Sharded parameters are gathered to the host first; with several processes every process must call
    this (the gather is a collective) and process 0 writes the folder."""
    state = nnx.state(system.model, system.trainable())
    flat = to_host({".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)})
    out_dir = os.path.abspath(out_dir)
    meta = dict(model="decomposer", config=config_dict(system.config),
                dtype=str(next(iter(flat.values())).dtype), overwrite=True)
    if jax.process_index() != 0:
        return out_dir
    return store.write_flat(out_dir, flat, extra={} if step is None else {"step": int(step)}, **meta)


def home() -> str:
    """Where runs live by default, outside any checkout: $DD_JAX_HOME, else ~/.cache/dd_jax."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DD_JAX_HOME") or os.path.join("~", ".cache", "dd_jax")))


def default_workdir(config_file: str) -> str:
    """`home()/runs/<name>` for a config file: `configs/tiny.py` -> tiny, `configs/gpu_h20.py:xray` ->
    gpu_h20-xray."""
    path, _, arg = os.fspath(config_file).partition(":") if not os.path.isfile(config_file) else (config_file, "", "")
    name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
    return os.path.join(home(), "runs", name)


def has_model_meta(path: str) -> bool:
    """Whether `path` holds a model metadata file (`store.META_FILE`), whatever is in it: `read_model_meta`
    checks it, with a one-line error. (`store.is_model_folder` also requires its format marker.)"""
    return os.path.isfile(os.path.join(os.fspath(path), store.META_FILE))


def read_model_meta(path: str) -> dict:
    """The metadata of a trained model folder, checked: RunError (one line naming the file) if it is not
    JSON, not ours, or has no config."""
    meta_path = os.path.join(os.fspath(path), store.META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path}: not a trained model folder (no {store.META_FILE})")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{meta_path}: not a dd_jax model's metadata (not JSON: {one_line(e)}); convert or "
                       f"export the model again") from e
    if not isinstance(meta, dict) or meta.get("format") != store.FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise RunError(f"{meta_path}: not a dd_jax model's metadata (format {found!r}, expected "
                       f"{store.FORMAT!r}); convert or export the model again")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("groups"), list):
        raise RunError(f"{meta_path}: a dd_jax model's metadata without its config or parameter groups; "
                       f"export the model again")
    return meta


def export_step(path: str, meta: dict | None = None) -> int | None:
    """The step a model folder was trained to: recorded at export, else (older exports) the config's
    train.steps, which is where a run exports."""
    meta = meta or read_model_meta(path)
    if isinstance(meta.get("step"), int):
        return meta["step"]
    steps = meta.get("config", {}).get("train", {}).get("steps")
    return int(steps) if isinstance(steps, int) else None


def read_params(system: system_lib.System, path: str) -> None:
    """Sets the system's trainable parameters from a model folder (an export) or a run workdir's export."""
    path = os.fspath(path)
    if not has_model_meta(path) and os.path.isdir(os.path.join(path, EXPORT)):
        path = os.path.join(path, EXPORT)
    if not has_model_meta(path):
        raise FileNotFoundError(f"{path}: not a trained model folder (no {store.META_FILE}) nor a run with an export")
    read_model_meta(path)
    state = nnx.state(system.model, system.trainable())
    variables = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    missing = set(variables)
    for _, arrays in store.read_groups(path):
        for name, arr in arrays.items():
            if name not in variables:
                raise RunError(f"{path}: parameter {name!r} is not in the model the config builds")
            if tuple(arr.shape) != tuple(variables[name].get_value().shape):
                raise ValueError(f"{path}: parameter {name!r} has shape {tuple(arr.shape)}, the model's is "
                                 f"{tuple(variables[name].get_value().shape)}")
            variables[name].set_value(jnp.asarray(arr, variables[name].get_value().dtype))
            missing.discard(name)
    if missing:
        raise RunError(f"{path}: no value for {len(missing)} parameter(s), e.g. {sorted(missing)[0]!r}")
    nnx.update(system.model, state)


def first_non_finite(module: nnx.Module) -> str | None:
    """The path of the first parameter of `module` (state order) holding a NaN or inf value, else None. One
    reduction per array and one transfer of the flags: cheap next to loading the weights."""
    flat = [(".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    flat = [(name, a) for name, a in flat if jnp.issubdtype(a.dtype, jnp.inexact)]
    flags = jax.device_get([jnp.isfinite(a).all() for _, a in flat])
    return next((name for (name, _), ok in zip(flat, flags) if not ok), None)


def check_finite(system: system_lib.System, source: str) -> None:
    """Raises RunError (one line naming the first bad parameter) if a parameter of the loaded model is NaN or
    inf: such a model writes black layers (and choosing a task from NaN scores is a coin toss)."""
    name = first_non_finite(system.model)
    if name is not None:
        raise RunError(f"{source}: parameter {name!r} holds NaN or inf values (a run that diverged, or a damaged "
                       f"file): its layers would be black; use an earlier checkpoint or another model")


# ------------------------------------------------------------------ trained weights of a run
@dataclasses.dataclass
class Weights:
    """One place a run's trained weights can be read from."""
    kind: str  # "checkpoint" | "export"
    path: str
    step: int | None

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, step {self.step if self.step is not None else 'unknown'})"


def weight_sources(run: str) -> list[Weights]:
    """Where a run's trained weights are, best first: checkpoints newer than the export (newest first), the
    export, then the older checkpoints (fallbacks should those not restore)."""
    export_dir = os.path.join(run, EXPORT)
    exp = None
    if has_model_meta(export_dir):
        exp = Weights("export", export_dir, export_step(export_dir))
    steps = []
    if os.path.isdir(os.path.join(run, CHECKPOINTS)):
        ckpts = Checkpoints(os.path.join(run, CHECKPOINTS), read_only=True)
        try:
            steps = ckpts.steps()
        finally:
            ckpts.close()
    ck = [Weights("checkpoint", os.path.join(run, CHECKPOINTS, str(s)), s) for s in steps]
    if exp is None:
        return ck
    newer = [w for w in ck if exp.step is None or w.step > exp.step]
    return newer + [exp] + [w for w in ck if w not in newer]


def _newest(run: str, sources: list[Weights], read: Callable[[Weights], object], log) -> tuple[Weights, object]:
    """The first source `read` succeeds on; says which (and which were skipped, and why)."""
    skipped = []
    for w in sources:
        try:
            out = read(w)
        except Exception as e:  # noqa: BLE001 - weights that do not read: try the next source
            skipped.append(f"{w.describe()}: {one_line(e)}")
            log(f"skipping {w.path}: it does not restore ({one_line(e)})")
            continue
        log(f"loading weights from {w.describe()}")
        return w, out
    if skipped:
        raise RunError(f"{run}: no trained weights restore (" + "; ".join(skipped) + ")")
    raise FileNotFoundError(f"{run}: no checkpoint yet, and no export")


def load_trained(path: str, config: ml_collections.ConfigDict | None = None, load_weights: bool = True,
                 log: Callable[[str], None] = _log, config_source: str = "the config given") -> system_lib.System:
    """A trained system from a model folder (an export), or a run workdir: of a run, its newest trained
    weights (`weight_sources`: newest restorable checkpoint or the export, whichever is later). Prints
    what it loaded (path and step) through `log`. A `config` (`config_source` names it in messages) may change
    how the model runs but not its architecture: RunError (`check_same_architecture`) before anything is built."""
    path = os.fspath(path)
    if has_model_meta(path):
        meta = read_model_meta(path)
        if config is not None:
            check_same_architecture(meta["config"], config, path, config_source)
        config = config or model_config(path, meta)
        system = system_lib.build(config, load_weights=load_weights)
        read_params(system, path)
        loaded = Weights('export', path, export_step(path, meta)).describe()
        log(f"loading weights from {loaded}")
        check_finite(system, loaded)
        return system
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model folder or training workdir")
    if config is not None:  # checked against what the run was trained as, before anything is built
        export_dir = os.path.join(path, EXPORT)
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            check_same_architecture(load_config(os.path.join(path, CONFIG_FILE)), config, path, config_source)
        elif has_model_meta(export_dir):
            check_same_architecture(read_model_meta(export_dir)["config"], config, path, config_source)
    sources = weight_sources(path)
    if config is None:
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            config = load_config(os.path.join(path, CONFIG_FILE))
        elif any(w.kind == "export" for w in sources):
            export_dir = os.path.join(path, EXPORT)
            config = model_config(export_dir, read_model_meta(export_dir))
        else:
            raise FileNotFoundError(f"{path}: neither a trained model folder nor a training workdir")
    system = system_lib.build(config, load_weights=load_weights)

    def read(w: Weights):
        if w.kind == "export":
            return read_params(system, w.path)
        ckpts = Checkpoints(os.path.join(path, CHECKPOINTS), read_only=True)
        try:
            state, _ = ckpts.restore(w.step, train_state(system, flow.system_optimizer(system)))
        finally:
            ckpts.close()
        nnx.update(system.model, state["params"])

    loaded, _ = _newest(path, sources, read, log)
    check_finite(system, loaded.describe())
    return system


def read_trained_flat(path: str, log: Callable[[str], None] = _log) -> tuple[dict[str, np.ndarray], dict]:
    """(flat trainable parameters as saved, config dict merged over configs/base.py) of a model folder or a
    run's newest trained weights (as `load_trained` chooses them), without building the model."""
    path = os.fspath(path)

    def read_export(p):
        meta = read_model_meta(p)
        flat = {}
        for _, arrays in store.read_groups(p):
            flat.update({k: np.asarray(v) for k, v in arrays.items()})
        return flat, config_dict(model_config(p, meta))

    if has_model_meta(path):
        log(f"reading weights from {Weights('export', path, export_step(path)).describe()}")
        return read_export(path)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)) and not has_model_meta(os.path.join(path, EXPORT)):
        raise FileNotFoundError(f"{path}: neither a trained model folder (export) nor a training workdir")

    def read(w: Weights):
        if w.kind == "export":
            return read_export(w.path)
        ckpts = Checkpoints(os.path.join(path, CHECKPOINTS), read_only=True)
        try:
            state, _ = ckpts.restore(w.step)
        finally:
            ckpts.close()
        return _flatten(state["params"]), config_dict(load_config(os.path.join(path, CONFIG_FILE)))

    return _newest(path, weight_sources(path), read, log)[1]


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """A restored (untargeted) nnx state -> {dotted path: array}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            if set(v) == {"value"} and not isinstance(v["value"], Mapping):  # an nnx Variable's pure dict
                out[key] = np.asarray(v["value"])
            else:
                out.update(_flatten(v, key))
        elif hasattr(v, "get_value"):
            out[key] = np.asarray(v.get_value())
        else:
            out[key] = np.asarray(v)
    return out
