"""The on-disk format of converted metric networks (LPIPS, FID InceptionV3).

One ``.safetensors`` file per network. Each tensor is named by its NNX
parameter path joined with dots (``Mixed_5b.branch1x1.conv.kernel``,
``net.conv1.bias``, ...) and stored in float32 in our layout (conv kernels
HWIO, as ``flax.nnx.Conv``). The header metadata ``dd_jax_format`` names the
network (``lpips-alex-v0.1``, ``inception-fid``), and ``source`` says which
files it was converted from. ``weights_conversion/lpips.py`` and
``weights_conversion/inception.py`` write such files from the PyTorch
checkpoints; loading needs no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

__all__ = ["save_flat", "load_flat", "module_to_flat", "load_module", "save_module"]


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def save_flat(flat: Mapping[str, np.ndarray], path: str | os.PathLike, fmt: str,
              source: str = "") -> None:
    """Write ``{param path: array}`` as a safetensors file tagged with format ``fmt``."""
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
    save_file(tensors, os.fspath(path), metadata={"dd_jax_format": fmt, "source": source})


def load_flat(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by ``save_flat``: (tensors, metadata)."""
    tensors = {}
    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def module_to_flat(module: nnx.Module) -> dict[str, np.ndarray]:
    """All variables of ``module`` as ``{dotted path: numpy array}``."""
    _, state = nnx.split(module)
    return {_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assign_flat(build: Callable[[], nnx.Module], flat: Mapping[str, np.ndarray],
                what: str = "network") -> nnx.Module:
    """Build a module (abstractly, no random init) and fill it from ``flat``.

    Every variable must be present with its exact shape; unknown keys are an error.
    """
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    entries = nnx.to_flat_state(state)
    expected = {_key(p) for p, _ in entries}
    missing = sorted(expected - set(flat))
    unexpected = sorted(set(flat) - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not match the architecture; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    filled = []
    for p, var in entries:
        arr = np.asarray(flat[_key(p)])
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"{what}: {_key(p)} has shape {arr.shape}, expected {var.shape}")
        filled.append((p, var.replace(jnp.asarray(arr, dtype=var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_module(build: Callable[[], nnx.Module], path: str | os.PathLike, fmt: str) -> nnx.Module:
    """Load a ``save_flat`` file of format ``fmt`` into the module ``build()`` returns."""
    flat, meta = load_flat(path)
    found = meta.get("dd_jax_format")
    if found != fmt:
        raise ValueError(f"{os.fspath(path)}: format {found!r}, expected {fmt!r} "
                         "(convert PyTorch checkpoints with scripts/convert_metrics_weights.py)")
    return assign_flat(build, flat, what=fmt)


def save_module(module: nnx.Module, path: str | os.PathLike, fmt: str, source: str = "") -> None:
    save_flat(module_to_flat(module), path, fmt, source)
