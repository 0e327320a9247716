"""Configs: the one module that loads them, and the one source of their defaults (configs/base.py).

Every config the code reads went through `merge` once, where it was loaded: a user's config file
(`load_config_file`: decompose/evaluate `--config`, the scripts; `dd_jax.train` merges what absl's
`--config` loaded), a run's `config.json` or a model folder's saved config (`dd_jax.checkpoints`). `merge`
lays the config over `configs/base.get_config()`, so a config saved before a field existed gets the base
value (which is what the code did without the field), and code reads plain attributes (`cfg.sample.tile`),
never `cfg.get(name, default)`. A field base does not have is an error naming it, except

- `FREE` fields: dicts of overrides whose keys are not schema-checked (`model.params`: FluxParams fields);
- `REMOVED` fields, in a saved config only: fields that existed once and did nothing, dropped on load so
  runs and models saved with them still load (a config file that sets one is refused, saying why).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections

from configs import base as base_config
from dd_jax import cli

# What `merge`, `section` and the checkpoint helpers accept: a ConfigDict or its plain-dict form.
ConfigLike = ml_collections.ConfigDict | Mapping[str, Any]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FREE = ("model.params",)
REMOVED = {
    "sample.guidance": "it was never read: sampling uses train.guidance (decompose/evaluate --guidance "
                       "override it)",
    "sample.task": "it was never read: decompose/evaluate take --task, the file name, or choose the task",
}


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field and where it came from."""


def base() -> ml_collections.ConfigDict:
    """A fresh copy of the defaults (configs/base.py)."""
    return base_config.get_config()


def _plain(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise ConfigError(f"not a config (a dict), but {type(config).__name__}")
    return dict(config)


def _merge_into(node: ml_collections.ConfigDict, data: Mapping, prefix: str, source: str, saved: bool) -> None:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in REMOVED:
            if saved:
                continue
            raise ConfigError(f"config field {path!r} in {source} was removed: {REMOVED[path]}")
        if key not in node:
            raise ConfigError(f"unknown config field {path!r} in {source} (configs/base.py lists the fields)")
        default = node[key]
        if path in FREE:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config field {path!r} in {source}: a dict of overrides, not {value!r}")
            node[key] = ml_collections.ConfigDict(dict(value))
        elif isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config field {path!r} in {source}: a group of fields, not {value!r}")
            _merge_into(default, value, path + ".", source, saved)
        else:
            try:
                node[key] = value
            except TypeError as e:
                raise ConfigError(f"config field {path!r} in {source}: {value!r} does not fit its type, "
                                  f"{type(default).__name__} (default {default!r})") from e


def merge(config: ConfigLike, source: str = "the config", saved: bool = False) -> ml_collections.ConfigDict:
    """`config` (a ConfigDict or a dict, e.g. a saved config.json) laid over `configs/base.get_config()`: a
    complete config, new (the input is not changed). `saved`: a config written by an earlier version (drops
    `REMOVED` fields). ConfigError (one line naming the field and `source`) for a field base does not have."""
    out = base()
    try:
        plain = _plain(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    _merge_into(out, plain, "", source, saved)
    return out


def section(name: str, given: ConfigLike | None = None) -> dict:
    """One group of fields (e.g. "mesh") as a dict: base's values updated with `given` (a dict or
    ConfigDict of some of them, or None; values as given, e.g. True for the "auto" string field
    distributed.enabled). For functions that take a group on its own (`dd_jax.sharding`)."""
    out = base()[name].to_dict()
    for key, value in (_plain(given) if given is not None else {}).items():
        if key not in out:
            raise ConfigError(f"unknown config field '{name}.{key}' (configs/base.py lists the fields)")
        out[key] = value
    return out


def load_json(path: str) -> ml_collections.ConfigDict:
    """A saved config (a run's config.json, JSON of `to_json_best_effort`) merged over base."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        line = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise ConfigError(f"{path}: not a readable config ({type(e).__name__}: {line})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a config (a JSON object), but {type(data).__name__}")
    return merge(data, path, saved=True)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """A config file merged over base: a Python file with `get_config()` (`configs/gpu_h20.py:xray` passes
    "xray" to it, as `dd_jax.train --config` does) or a saved config (.json)."""
    arg = None
    if not os.path.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        near = cli.close_matches(path)
        raise FileNotFoundError(f"{path}: no such config file" + (f"; did you mean {' or '.join(near)}?"
                                                                  if near else ""))
    if path.endswith(".json"):
        return load_json(path)
    spec = importlib.util.spec_from_file_location("dd_jax_user_config", path)
    if spec is None:
        raise ConfigError(f"{path}: not a config file (a Python file with get_config(), or a saved .json config)")
    module = importlib.util.module_from_spec(spec)
    # a config file may import modules of its own repository (configs/ here is imported already)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, repo)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error ({e.msg}); fix the config file") from e
    except Exception as e:  # noqa: BLE001 - whatever the file's own code raises: one line naming it
        raise ConfigError(f"{path}: loading it raised {_one_line(e)}; fix the config file") from e
    finally:
        sys.path.remove(repo)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path}: no get_config() function (a config file defines get_config() returning the "
                          f"config, e.g. configs/tiny.py)")
    try:
        config = get_config() if arg is None else get_config(arg)
    except Exception as e:  # noqa: BLE001 - as above
        call = "get_config()" if arg is None else f"get_config({arg!r})"
        raise ConfigError(f"{path}: {call} raised {_one_line(e)}; fix the config file") from e
    if config is None:
        raise ConfigError(f"{path}: get_config() returned None (a missing return statement?)")
    return merge(config, path)


def _one_line(e: BaseException) -> str:
    text = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
