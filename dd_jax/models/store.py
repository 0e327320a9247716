"""The on-disk format of converted models: grouped orbax checkpoints.

A converted model folder holds

    dd_jax_model.json      {"format", "model", "config", "dtype", "groups"}
    groups/<group>/        one orbax (StandardCheckpointer) checkpoint per group

A group is a slice of the parameter tree (one transformer block, one embedder,
...). Writing and reading go group by group, so converting or loading a 12B
model never holds more than one group in host memory, and each group is a
plain orbax checkpoint that orbax tools can open. A folder only appears under
its final name once every group is written (write to a temporary sibling,
then rename), so a crash never leaves something that looks complete. Folders
are created with the process umask's permissions. An existing folder is
replaced only with `overwrite=True`, and only when it is a model folder (it
holds `dd_jax_model.json`) or empty: anything else is refused, never deleted.

Parameter paths are strings joined with '.', as in the model's NNX state
(`double_blocks.0.img_attn.qkv.kernel`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import hostmem

if TYPE_CHECKING:
    from types import TracebackType
    from typing import TypeAlias

    from jax.typing import DTypeLike

    # `shardings` of the loaders: flat path -> Sharding, or a function of the abstract module giving one.
    FlatShardings: TypeAlias = Mapping[str, jax.sharding.Sharding]
    Shardings: TypeAlias = FlatShardings | Callable[[nnx.Module], FlatShardings]
    # `convert` of the loaders: (flat path, host array, its sharding or None) -> the value to set, or None
    Convert: TypeAlias = Callable[[str, np.ndarray, Any], Any]

FORMAT = "dd_jax.grouped/1"
META_FILE = "dd_jax_model.json"


def _orbax():
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    return ocp


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_group(path: str) -> str:
    """`double_blocks.3.img_attn.qkv.kernel` -> `double_blocks.3`; `img_in.kernel` -> `img_in`."""
    parts = path.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def module_group(path: str) -> str:
    """One group per module: `double_blocks.3.img_attn.qkv.kernel` -> `double_blocks.3.img_attn.qkv`.

    The converters' grouping: a group is then at most one fused Linear, so
    conversion memory follows the largest tensor.
    """
    return path.rsplit(".", 1)[0] if "." in path else path


def _local_checkpointer():
    """An orbax checkpointer for host arrays that THIS process writes alone.

    Model folders hold host numpy written by one process; orbax's default
    waits at barriers for every JAX process, which would hang a multi-process
    run in which only process 0 writes (e.g. a training export)."""
    ocp = _orbax()
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def is_model_folder(path: str) -> bool:
    """Whether `path` is a folder this module wrote: it holds META_FILE naming FORMAT (the marker)."""
    try:
        with open(os.path.join(os.fspath(path), META_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out_dir: str, overwrite: bool) -> None:
    """Raises FileExistsError (one line: the path and what to do) unless a model folder may be written at
    `out_dir`: nothing there, or `overwrite` and a model folder (see `is_model_folder`) or an empty folder."""
    out_dir = os.fspath(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it, or choose "
                              "another output")
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} is not a folder; --overwrite replaces only dd_jax model folders: move "
                              "it away or choose another output")
    if os.listdir(out_dir) and not is_model_folder(out_dir):
        raise FileExistsError(f"{out_dir} is not a dd_jax model folder (no {META_FILE}); --overwrite replaces "
                              "only those: move it away or choose another output")


def _new_sibling(out_dir: str, kind: str) -> str:
    """Creates `.<name>.<kind>-<pid>-<random>` next to `out_dir` (mode from the umask, unlike mkdtemp's 700)."""
    parent, name = os.path.split(out_dir)
    while True:
        path = os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _siblings(out_dir: str) -> list[str]:
    """Temporary siblings (`.<name>.partial-*`, `.<name>.replaced-*`) of earlier writes of `out_dir`."""
    parent, name = os.path.split(out_dir)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries
                  if e.startswith(f".{name}.partial-") or e.startswith(f".{name}.replaced-"))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GroupedWriter:
    """Writes a model folder group by group; `commit()` makes it appear at `out_dir`.

    Use as a context manager: leaving the block with an exception removes the
    temporary folder, and nothing is left at `out_dir`.
    """

    def __init__(self, out_dir: str, *, model: str, config: Mapping[str, Any], dtype: str, overwrite: bool = False,
                 extra: Mapping[str, Any] | None = None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        check_replaceable(self.out_dir, overwrite)
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        stale = _siblings(self.out_dir)
        if stale:
            print(f"note: {', '.join(stale)} left by an interrupted (or running) write of {self.out_dir}; "
                  "delete them when no conversion runs", file=sys.stderr)
        self.tmp_dir = _new_sibling(self.out_dir, "partial")
        self.meta = {"format": FORMAT, "model": model, "config": dict(config), "dtype": dtype, "groups": [],
                     **dict(extra or {})}  # extra: e.g. the step an export was trained to
        self._ckptr = _local_checkpointer()
        self.overwrite = overwrite

    def write_group(self, group: str, flat: Mapping[str, np.ndarray]) -> None:
        if group in self.meta["groups"]:
            raise ValueError(f"group {group!r} written twice")
        self._ckptr.save(os.path.join(self.tmp_dir, "groups", group), _nest(flat))
        self._ckptr.wait_until_finished()
        self.meta["groups"].append(group)
        hostmem.release_free_memory()  # the group's host arrays are gone: hand their pages back

    def commit(self) -> str:
        with open(os.path.join(self.tmp_dir, META_FILE), "w") as f:
            json.dump(self.meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.lexists(self.out_dir):
            check_replaceable(self.out_dir, self.overwrite)  # again: it may have appeared meanwhile
            old = os.path.join(os.path.dirname(self.out_dir),
                               f".{os.path.basename(self.out_dir)}.replaced-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(self.out_dir, old)  # set aside, removed once the new folder is in place
        os.rename(self.tmp_dir, self.out_dir)
        _fsync_dir(os.path.dirname(self.out_dir))
        if old is not None:
            shutil.rmtree(old)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> GroupedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        self._ckptr.close()


def write_flat(out_dir: str, flat: Mapping[str, np.ndarray], *, model: str, config: Mapping[str, Any],
               dtype: str, group_fn: Callable[[str], str] = default_group, overwrite: bool = False,
               extra: Mapping[str, Any] | None = None) -> str:
    """Writes an in-memory flat parameter dict (small models, saving trained weights); `extra`: more metadata."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for path, arr in flat.items():
        groups.setdefault(group_fn(path), {})[path] = np.asarray(arr)
    with GroupedWriter(out_dir, model=model, config=config, dtype=dtype, overwrite=overwrite, extra=extra) as w:
        for g, items in groups.items():
            w.write_group(g, items)
        return w.commit()


def read_meta(model_dir: str) -> dict:
    path = os.path.join(os.fspath(model_dir), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: not a converted dd_jax model folder (no {META_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{model_dir}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def read_groups(model_dir: str, targets: Mapping[str, jax.ShapeDtypeStruct] | None = None,
                groups: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (group, flat dict) one group at a time.

    `targets` (flat path -> ShapeDtypeStruct, optionally with sharding) sets the
    dtype/sharding of what is restored; without it, numpy arrays as stored.
    """
    meta = read_meta(model_dir)
    ocp = _orbax()
    ckptr = ocp.StandardCheckpointer()
    try:
        for group in groups if groups is not None else meta["groups"]:
            gdir = os.path.join(os.path.abspath(model_dir), "groups", group)
            if targets is None:
                tree = ckptr.restore(gdir)
            else:
                stored = _flatten(ckptr.metadata(gdir).item_metadata.tree)
                missing = [k for k in stored if k not in targets]
                if missing:
                    raise KeyError(f"{model_dir}: stored parameter(s) not in the model: {missing[:5]}")
                tree = ckptr.restore(gdir, _nest({k: targets[k] for k in stored}))
            yield group, _flatten(tree)
    finally:
        ckptr.close()


def _place(arr, sharding):
    """Host array -> device array, directly into `sharding` (multi-host safe: each process fills its shards)."""
    if sharding is None:
        return jnp.asarray(arr)
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _stacked_order(groups: Iterable[str], per_layer: Mapping[str, tuple[str, int]]) -> list[str]:
    """Reads groups so that each stacked array completes as early as possible (stored per module,
    one stacked module's layers are read back to back and then leave host memory)."""
    def key(group):
        hits = [per_layer[k] for k in per_layer if k.rsplit(".", 1)[0] == group or k.startswith(group + ".")]
        return (min((h[0] for h in hits), default=""), min((h[1] for h in hits), default=-1))

    return sorted(groups, key=key)


def load_module(model_dir: str, abstract_module: nnx.Module, *, shardings: Mapping[str, Any] | None = None,
                stacked: Mapping[str, Sequence[str]] | None = None, convert: Convert | None = None) -> nnx.Module:
    """Fills an abstract NNX module (from `nnx.eval_shape`) with stored weights.

    Each parameter is restored in the dtype of the abstract module's variable
    (so the caller picks the dtype by how it builds the module), group by
    group. `shardings` (flat path -> jax.sharding.Sharding) places arrays
    directly on devices. `stacked` (model path -> stored per-layer paths)
    fills a variable with a leading layer axis from stored per-layer arrays
    (a scanned model from per-block groups). `convert(path, host array,
    sharding)` may place a variable itself, e.g. quantized (`dd_jax.quantize.loader`):
    what it returns (not None) becomes the variable's value. Every variable
    must be stored, and nothing extra.
    """
    graphdef, state = nnx.split(abstract_module)
    variables = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    stacked = dict(stacked or {})
    per_layer = {src: (name, i) for name, srcs in stacked.items() for i, src in enumerate(srcs)}
    targets, buffers, counts = {}, {}, {}
    for name, var in variables.items():
        abstract = var.get_value()
        sharding = (shardings or {}).get(name)
        if name in stacked:
            if len(stacked[name]) != abstract.shape[0]:
                raise ValueError(f"{name}: {len(stacked[name])} sources for {abstract.shape[0]} layers")
            for src in stacked[name]:
                targets[src] = jax.ShapeDtypeStruct(abstract.shape[1:], abstract.dtype)
        else:
            targets[name] = jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)
    filled = set()
    order = _stacked_order(read_meta(model_dir)["groups"], per_layer) if stacked else None
    for _, arrays in read_groups(model_dir, targets, groups=order):
        for src, arr in arrays.items():
            if tuple(arr.shape) != tuple(targets[src].shape):
                raise ValueError(f"{model_dir}: {src} stored with shape {tuple(arr.shape)}, "
                                 f"the model expects {tuple(targets[src].shape)}")
            if src in per_layer:
                name, i = per_layer[src]
                abstract = variables[name].get_value()
                buf = buffers.setdefault(name, np.empty(abstract.shape, abstract.dtype))
                buf[i] = np.asarray(arr)
                counts[name] = counts.get(name, 0) + 1
                if counts[name] < len(stacked[name]):
                    continue
                arr, src = buffers.pop(name), name
            value = convert(src, arr, (shardings or {}).get(src)) if convert is not None else None
            if value is None and src in stacked:
                value = _place(arr, (shardings or {}).get(src))
            elif value is None:
                sharding = targets[src].sharding
                value = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
            variables[src].set_value(value)
            filled.add(src)
        del arrays
    missing = sorted(set(variables) - filled)
    if missing:
        raise KeyError(f"{model_dir}: parameter(s) missing from the checkpoint: {missing[:8]}"
                       + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return nnx.merge(graphdef, state)


def load_model(path: str, model: str, build: Callable[[dict, Any], Any], dtype: DTypeLike | None = None, *,
               shardings: Shardings | None = None,
               stacked: Callable[[Any], Mapping[str, Sequence[str]]] | None = None,
               convert: Convert | None = None) -> nnx.Module:
    """Loads a converted component folder holding `model` ("flux", "autoencoder", "t5", "clip", ...).

    `build(config_dict, param_dtype)` returns the abstract module (from
    `nnx.eval_shape`); `dtype` is the parameter dtype (default: as stored).
    `shardings` is a flat path -> Sharding mapping, or a function of the
    abstract module returning one; `stacked(module)` gives `load_module`'s
    stacked-layer map; `convert` is `load_module`'s.
    """
    meta = read_meta(path)
    if meta["model"] != model:
        raise ValueError(f"{path} holds a {meta['model']!r} model, not {model!r}")
    module = build(meta["config"], jnp.dtype(dtype or meta["dtype"]))
    if callable(shardings):
        shardings = shardings(module)
    return load_module(path, module, shardings=shardings, stacked=stacked(module) if stacked else None,
                       convert=convert)
