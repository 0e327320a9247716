"""Compiling for a GPU that is not here (dd_jax.aot.gpu_mesh, scripts/gpu_aot.py): the placement of abstract
inputs on a mesh, and the one-line refusal without jax's CUDA plugin. The GPU compilation itself needs the
plugin, which CI does not install; docs/speed.md has its figures."""

from __future__ import annotations

import importlib.util

import jax
import pytest
from flax import nnx

from configs import tiny
from dd_jax import aot


def _cuda_plugin() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def test_targets_and_refusals():
    assert "h100_80gb" in aot.gpu_targets()
    with pytest.raises(ValueError, match="choose from"):
        aot.gpu_mesh("h100_typo")
    if _cuda_plugin():
        pytest.skip("jax's CUDA plugin is installed: gpu_mesh builds the topology")
    with pytest.raises(RuntimeError, match="CUDA plugin"):
        aot.gpu_mesh()


def test_abstract_inputs_placed_on_a_mesh_compile_for_its_devices():
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("gpu",))
    c = tiny.get_config()
    c.data.height = c.data.width = 32
    c.data.batch_size = 1
    model = aot.on_mesh(nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0))), mesh)
    shardings = {v.get_value().sharding for _, v in nnx.to_flat_state(nnx.state(model))}
    assert shardings == {jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    assert aot.on_mesh({"a": jax.ShapeDtypeStruct((2,), "float32")}, None)["a"].sharding is None  # no mesh: as is
    step = aot.compile_train_step(c, txt_len=4, mesh=mesh)
    assert step.memory.argument_size_in_bytes > 0
    placed = jax.tree.leaves(step.compiled.input_shardings)
    assert placed and all(getattr(x, "mesh", None) == mesh for x in placed)  # compiled for the mesh's device
