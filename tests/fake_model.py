"""A stand-in for the network in decompose / inference tests: a pointwise function of the composite.

`FakeSystem` has what `dd_jax.inference` and `dd_jax.decompose` read of a
System; `patch(monkeypatch)` replaces `system_lib.decompose` with `pointwise`
and returns the list of model inputs seen, one (composite [B, H, W, 3] in
[0, 1], task indices) per call.
"""

import types

import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import inference


class FakeSystem:
    def __init__(self, tile=16, targets=("x", "y")):
        self.config = ml_collections.ConfigDict({"data": {"height": tile, "width": tile},
                                                  "sample": {"tile": True, "steps": 1}, "model": {"quantize": ""}})
        self.spec = types.SimpleNamespace(targets=targets)
        self.model = types.SimpleNamespace(conditioner=object(), transformer=types.SimpleNamespace())  # no LoRA


def pointwise(comp, task):
    """Layers in [-1, 1] that depend on each pixel alone and on the task (so a second pass changes the image)."""
    t = np.asarray(task, np.float32)[:, None, None, None]
    return {"y": 0.7 * comp + 0.2 * np.sin(3 * comp) - 0.05 * t, "x": comp ** 2 - 0.5}


def patch(monkeypatch) -> list:
    calls = []

    def decompose_fn(system, composite, task, key, steps, guidance=None, extra=None):
        calls.append(((np.asarray(composite) + 1) / 2, np.asarray(task)))
        return {k: jnp.asarray(v) for k, v in pointwise(np.asarray(composite), np.asarray(task)).items()}

    monkeypatch.setattr(inference.system_lib, "decompose", decompose_fn)
    return calls


def patch_decompose(monkeypatch, tile: int) -> list:
    """dd_jax.decompose with `FakeSystem(tile)` for the model and no task head; the model inputs seen, per call."""
    from dd_jax import decompose

    calls = patch(monkeypatch)
    monkeypatch.setattr(decompose.checkpoints, "load_trained", lambda *a, **k: FakeSystem(tile))
    monkeypatch.setattr(decompose.inference, "load_task_head", lambda *a, **k: None)
    return calls
