"""Packages only some features need, imported where the feature runs; a missing one is named in one line.

The GPU hosts (docs/gpu_host.md) have jax, flax, optax, orbax, numpy, transformers and torch but none of these;
decomposition and the device check run there without them, and a feature that needs one says so:

    decompose --format psd needs psd-tools: pip install psd-tools==1.10.4

`require(module, feature)` imports and returns the module, or raises `MissingPackage` with that line.
`PINS` are pyproject.toml's versions (tests/test_optional.py checks that they agree).
"""

from __future__ import annotations

import importlib
import types

# top-level module -> the pip requirement that provides it (pyproject.toml's pin)
PINS = {
    "grain": "grain==0.2.18",
    "array_record": "array_record==0.8.6",
    "tensorflow_datasets": "tensorflow-datasets==4.9.10",
    "clu": "clu==0.0.12",
    "tensorboardX": "tensorboardX==2.6.4",
    "psd_tools": "psd-tools==1.10.4",
    "qwix": "qwix==0.1.8",
    "ml_collections": "ml_collections==1.1.0",
}

# top-level module -> the extra of dd_jax that brings it (with its pins): its install line names the extra
EXTRAS = {"gradio": "app"}


class MissingPackage(ImportError, ValueError):
    """An optional package a feature needs is not installed. A ValueError too, so the CLIs that print a
    ValueError's one line (`error: ...`) print this one the same way."""


def message(module: str, feature: str, cause: ImportError | None = None) -> str:
    """`FEATURE needs DIST: pip install PIN`, with the import error in brackets unless it is just `module`
    (or its package) not being installed (e.g. a dependency of it that is missing, or a broken install)."""
    top = module.split(".")[0]
    pin = PINS.get(top, top)
    dist = pin.split("==")[0]
    missing = getattr(cause, "name", None) or ""
    plain = cause is None or (isinstance(cause, ModuleNotFoundError) and missing.split(".")[0] == top)
    detail = "" if plain else f" ({cause})"
    install = f'pip install -e ".[{EXTRAS[top]}]"' if top in EXTRAS else f"pip install {pin}"
    return f"{feature} needs {dist}{detail}: {install}"


def require(module: str, feature: str) -> types.ModuleType:
    """Imports `module` (e.g. "psd_tools") for `feature` (e.g. "decompose --format psd") and returns it; raises
    MissingPackage (one line, with the pip command) when it or a package it imports is not installed. A folder of
    that name on the path (e.g. in the working folder: gradio_client's downloads go to /tmp/gradio), which Python
    imports as an empty namespace package, is not the package."""
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(message(module, feature, e), name=module) from e
    if "." not in module and getattr(found, "__file__", None) is None:
        raise MissingPackage(message(module, feature), name=module)
    return found
