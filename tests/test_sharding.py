"""dd_jax.sharding on one device: rules, specs, mesh sizes, placement, batches, multi-host switch.

(The multi-device equivalence runs in tests/test_sharding_devices.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from dd_jax import lora, sharding
from dd_jax.models import flux, store

MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


def test_rules_defaults_and_overrides():
    rules = sharding.resolve_rules()
    assert rules["embed"] == ("fsdp",) and rules["activation_batch"] == ("data", "fsdp") and rules["norm"] == ()
    over = sharding.resolve_rules([("embed", None), ("activation_length", "tensor"), ["mlp", ["fsdp", "tensor"]]])
    assert over["embed"] == () and over["activation_length"] == ("tensor",) and over["mlp"] == ("fsdp", "tensor")
    assert over["qkv"] == ("tensor",)  # untouched names keep their default
    cfg = ml_collections.ConfigDict({"embed": "data"})
    assert sharding.resolve_rules(cfg)["embed"] == ("data",)


def test_logical_to_spec():
    spec = lambda names, shape=None, rules=None: sharding.logical_to_spec(names, MESH, rules, shape)
    assert spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert spec(("layers", "embed", "lora_rank")) == P(None, "fsdp", None)
    assert spec(("activation_batch", None, None)) == P(("data", "fsdp"), None, None)
    # a mesh axis is used once: the first dimension naming it wins
    assert spec(("embed", "embed")) == P("fsdp", None)
    # a dimension keeps only the leading mesh axes that divide it
    assert spec(("activation_batch",), (4,)) == P("data")
    assert spec(("activation_batch",), (1,)) == P(None)
    assert spec(("embed", "mlp"), (6, 3)) == P(None, None)
    # size-1 axes are dropped
    assert sharding.logical_to_spec(("embed",), AbstractMesh((8, 1, 1), sharding.MESH_AXES)) == P(None)
    with pytest.raises(KeyError, match="no sharding rule"):
        spec(("nonsense",))


def test_mesh_sizes():
    mesh = sharding.make_mesh(None)
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert sharding._fill([2, -1, 2], 8, "m") == [2, 2, 2]
    with pytest.raises(ValueError, match="at most one"):
        sharding._fill([-1, -1, 1], 8, "m")
    with pytest.raises(ValueError, match="cannot fill"):
        sharding._fill([3, -1, 1], 8, "m")
    with pytest.raises(ValueError, match="use 4 devices"):
        sharding._fill([2, 2, 1], 8, "m")


def _with_lora(model):
    lora.apply_lora(model, rank=2)
    return model


def test_every_parameter_is_named():
    """Logical names on every parameter of both layouts, LoRA adapters following their base kernel."""
    for scan in (False, True):
        m = nnx.eval_shape(lambda: _with_lora(flux.Flux(flux.PRESETS["tiny"], rngs=nnx.Rngs(0), scan_layers=scan)))
        _, st = nnx.split(m)
        for path, var in nnx.to_flat_state(st):
            names = sharding.variable_names(var)
            assert names is not None and len(names) == len(var.get_value().shape), (path, names)
            assert (names[0] == "layers") == (scan and path[0] in flux.STACKED), (path, names)
        qkv = m.double_blocks.img_attn.qkv if scan else m.double_blocks[0].img_attn.qkv
        assert sharding.variable_names(qkv.lora_a)[-2:] == ("embed", "lora_rank")
        assert sharding.variable_names(qkv.lora_b)[-2:] == ("lora_rank", "qkv")


def test_load_straight_into_shardings_and_shard_model(tmp_path):
    params = flux.PRESETS["tiny"]
    m = flux.Flux(params, rngs=nnx.Rngs(0))
    _, st = nnx.split(m)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(st)}
    path = store.write_flat(str(tmp_path / "m"), flat, model="flux", config=params.to_dict(), dtype="float32")
    mesh = sharding.make_mesh({"fsdp": -1})
    with jax.set_mesh(mesh):  # abstract models under a mesh must not trip over the logical names
        loaded = flux.load(path, scan_layers=True, shardings=lambda a: sharding.flat_shardings(a, mesh))
        lora.apply_lora(loaded, rank=2)
        sharding.shard_model(loaded, mesh)
    assert loaded.double_blocks.activation_sharding is not None
    assert loaded.activation_sharding.mesh is mesh
    assert all(isinstance(s, P) for s in sharding.placement(loaded).values())
    np.testing.assert_array_equal(np.asarray(loaded.single_blocks.linear2.kernel[...][1]),
                                  flat["single_blocks.1.linear2.kernel"])
    sharding.unshard_activations(loaded)
    assert loaded.activation_sharding is None


def test_shard_batch_leaves():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    batch = {"composite": np.ones((2, 4, 4, 3), np.float32), "task": np.array([1, 2], np.int32),
             "caption": np.array(["a", "b"]), "step": np.int32(3), "ids": np.zeros((5, 3), np.float32)}
    out = sharding.shard_batch(batch, mesh, replicate=lambda p: "ids" in p)
    assert isinstance(out["composite"], jax.Array) and out["composite"].shape == (2, 4, 4, 3)
    assert out["task"].dtype == jnp.int32 and out["step"].shape == ()
    assert isinstance(out["caption"], np.ndarray) and list(out["caption"]) == ["a", "b"]
    assert out["ids"].sharding.spec == P()


def test_distributed_only_when_asked(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
              "TPU_WORKER_HOSTNAMES", "JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not sharding.is_multihost_environment()
    assert sharding.maybe_initialize_distributed() is False
    assert sharding.maybe_initialize_distributed({"enabled": False, "coordinator_address": "x:1"}) is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.is_multihost_environment()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")
    assert sharding.is_multihost_environment()
