"""The sharded train step on 8 forced host devices gives the single-device step's numbers.

JAX fixes its device count at import, so the work runs in a child process
(this file run as a script, with XLA_FLAGS forcing 8 CPU devices) that
prints one JSON line; the test checks it. Meshes (data x fsdp x tensor)
8x1x1, 2x4x1 and 2x2x2 (the last with the scanned layout), float32: loss of
every step and the updated LoRA parameters match to 1e-5. Also: splash attention under a
mesh (shard_map over batch and heads) gives the XLA forward.
"""

from __future__ import annotations

import json
import os
import sys

import host_devices

MESHES = [tuple(int(x) for x in m.split(",")[:3]) + (m.endswith("s"),)
          for m in os.environ.get("DD_MESHES", "8,1,1;2,4,1;2,2,2,s").split(";")]
STEPS = 2


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dd_jax import flow, icd, lora, sharding
    from dd_jax.models import flux

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    params = flux.FluxParams.from_dict({**flux.PRESETS["tiny"].to_dict(), "depth": 1, "depth_single_blocks": 2})
    spec = icd.LayerSpec()
    h, w, bsz, n_txt = 2, 4, 8, 8
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    host = flow.Batch(layers={n: f(bsz, h * w, params.in_channels) for n in spec.layers},
                      txt=f(bsz, n_txt, params.context_in_dim), txt_ids=np.zeros((n_txt, 3), np.float32),
                      y=f(bsz, params.vec_in_dim), grid=(h, w))

    def make(scan: bool):
        m = flux.Flux(params, rngs=nnx.Rngs(0), scan_layers=scan)
        lora.apply_lora(m, rank=4, alpha=4, rngs=nnx.Rngs(1))
        return m

    # random weights once, in numpy; every model below is an abstract one filled with them (no eager op compiles)
    wrng = np.random.default_rng(1)
    _, st = nnx.split(nnx.eval_shape(lambda: make(False)))
    weights = {}
    for p, v in nnx.to_flat_state(st):
        name, shape = ".".join(map(str, p)), v.get_value().shape
        if name.endswith(("scale", "lora_b")):  # RMSNorm scales 1; LoRA B 0 (the LoRA start)
            weights[name] = np.full(shape, 1.0 if name.endswith("scale") else 0.0, np.float32)
        else:
            scale = 0.01 if name.endswith("bias") else shape[-2] ** -0.5
            weights[name] = (scale * wrng.standard_normal(shape)).astype(np.float32)

    def build(scan: bool):
        m = nnx.eval_shape(lambda: make(scan))
        flat = flux.stack_flat(weights) if scan else weights
        _, st = nnx.split(m)
        for p, v in nnx.to_flat_state(st):
            v.set_value(jnp.asarray(flat[".".join(map(str, p))]))
        return m

    def run(model, batch):
        opt = flow.make_optimizer(model, learning_rate=1e-3)
        step = flow.make_train_step(spec, guidance=3.5)
        losses = []
        for i in range(STEPS):
            out = step(model, opt, batch, jax.random.key(i))
            losses.append(float(out[0] if isinstance(out, tuple) else out))
        _, st = nnx.split(model)
        flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(st)
                if isinstance(v, nnx.LoRAParam)}
        return losses, flat, opt

    def pspec(x):
        """A PartitionSpec as a list, trailing Nones dropped (its printed form varies across versions)."""
        parts = [list(a) if isinstance(a, tuple) else a for a in (x.sharding.spec if hasattr(x, "sharding") else x)]
        while parts and parts[-1] is None:
            parts.pop()
        return parts

    ref_losses, ref_lora, _ = run(build(False), jax.tree.map(jnp.asarray, host))
    result = {"reference": ref_losses, "meshes": []}
    for d, fs, t, scan in MESHES:
        mesh = sharding.make_mesh({"data": d, "fsdp": fs, "tensor": t})
        with jax.set_mesh(mesh):
            model = sharding.shard_model(build(scan), mesh)
            batch = sharding.shard_batch(host, mesh, replicate=lambda p: "txt_ids" in p)
            losses, flat, opt = run(model, batch)
        if scan:
            ref = flux.stack_flat(ref_lora)
        else:
            ref = ref_lora
        err = max(float(np.abs(flat[k] - ref[k]).max()) for k in ref)
        moved = max(float(np.abs(ref[k]).max()) for k in ref if k.endswith("lora_b"))
        place = sharding.placement(model)
        opt_place = sharding.placement(opt)
        prefix = "double_blocks." if scan else "double_blocks.0."
        kernel = prefix + "img_mlp.0.kernel"
        result["meshes"].append({
            "mesh": [d, fs, t], "scan": scan, "losses": losses, "lora_max_abs_err": err, "lora_b_max": moved,
            "batch_spec": pspec(batch.txt), "kernel": pspec(place[kernel]),
            "lora_a": pspec(place[prefix + "img_mlp.0.lora_a"]), "lora_b": pspec(place[prefix + "img_mlp.0.lora_b"]),
            "adam_mu_lora_a": pspec(next(v for k, v in opt_place.items()
                                        if k.endswith(".mu." + prefix + "img_mlp.0.lora_a"))),
            "kernel_after": pspec(model.double_blocks.img_mlp[0].kernel.get_value() if scan
                                 else model.double_blocks[0].img_mlp[0].kernel.get_value()),
            "all": {k: pspec(v) for k, v in place.items()},
        })
    # splash attention (Pallas; interpret mode on CPU) under the 2x2x2 mesh runs per shard in a shard_map
    small = flux.FluxParams.from_dict({**params.to_dict(), "depth_single_blocks": 1})
    ids = jnp.zeros((spec_len := 3 * h * w, 3))
    args = (host.layers["z"].repeat(3, axis=1), ids, host.txt, host.txt_ids, np.full((bsz,), 0.4, np.float32),
            host.y, np.full((bsz,), 3.0, np.float32))
    fwd = nnx.jit(lambda m, *a: m(*a))
    want = fwd(flux.Flux(small, rngs=nnx.Rngs(0)), *map(jnp.asarray, args))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        m = sharding.shard_model(flux.Flux(small, rngs=nnx.Rngs(0), attention_impl="splash"), mesh)
        got = fwd(m, *sharding.shard_batch(args, mesh, replicate=lambda p: p == "[1]" or p == "[3]"))
    result["splash_mesh_err"] = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    assert spec_len == got.shape[1]
    return result


def test_sharded_step_matches_single_device():
    out = host_devices.run_with_8_devices(__file__)
    ref = out["reference"]
    for m in out["meshes"]:
        for a, b in zip(m["losses"], ref):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (m["mesh"], m["losses"], ref)
        assert m["lora_b_max"] > 1e-4  # the step moved the adapters
        assert m["lora_max_abs_err"] <= 1e-5, m
    assert out["splash_mesh_err"] <= 2e-5
    by = {tuple(m["mesh"]): m for m in out["meshes"]}
    # the batch over (data, fsdp); the base kernel over fsdp x tensor; LoRA and Adam state follow it
    assert by[(8, 1, 1)]["batch_spec"] == ["data"] and by[(8, 1, 1)]["kernel"] == []
    m2 = by[(2, 4, 1)]
    assert m2["batch_spec"] == [["data", "fsdp"]]
    assert m2["kernel"] == ["fsdp"] == m2["lora_a"] == m2["adam_mu_lora_a"] == m2["kernel_after"]
    m3 = by[(2, 2, 2)]
    assert m3["kernel"] == [None, "fsdp", "tensor"] == m3["kernel_after"]
    assert m3["lora_a"] == [None, "fsdp"] == m3["adam_mu_lora_a"] and m3["lora_b"] == [None, None, "tensor"]
    check_every_placement(m3)


# Every parameter's placement under data x fsdp x tensor, written out by role (Megatron-style): a
# column-parallel layer splits its output over tensor, a row-parallel one its input; both split the other
# (model) axis over fsdp, except the embeddings' raw inputs; LoRA A follows the kernel's input axis and B its
# output axis; a bias follows the kernel's output axis; modulations split only their input; norms replicate.
COLUMN = ("qkv", "img_mlp.0", "txt_mlp.0", "linear1", "in_layer")
ROW = ("proj", "img_mlp.2", "txt_mlp.2", "linear2", "out_layer")


def expected_placement(name: str) -> list:
    layer, leaf = name.rsplit(".", 1)
    if leaf == "scale":
        return []
    if layer.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1", "final_layer.linear")):
        kernel = ["fsdp", None]
    elif layer in ("img_in", "txt_in"):
        kernel = [None, "fsdp"]
    elif layer.endswith(COLUMN):
        kernel = [None if layer.endswith("in_layer") else "fsdp", "tensor"]
    elif layer.endswith(ROW):
        kernel = ["tensor", "fsdp"]
    else:
        raise AssertionError(f"no role for {name}")
    want = {"kernel": kernel, "bias": [kernel[1]], "lora_a": [kernel[0], None], "lora_b": [None, kernel[1]]}[leaf]
    while want and want[-1] is None:
        want.pop()
    return want


def test_expected_placement_covers_every_role():
    assert expected_placement("double_blocks.0.img_attn.qkv.lora_b") == [None, "tensor"]
    assert expected_placement("single_blocks.0.modulation.lin.bias") == []
    assert expected_placement("time_in.in_layer.kernel") == [None, "tensor"]


def check_every_placement(mesh_result: dict) -> None:
    """All parameters of a 2x2x2 mesh (scanned stacks have a leading, unsplit layer axis)."""
    scan = mesh_result["scan"]
    wrong = {}
    for name, got in mesh_result["all"].items():
        stacked = scan and name.startswith(("double_blocks.", "single_blocks."))
        want = expected_placement(name.replace("double_blocks.", "double_blocks.0.").replace(
            "single_blocks.", "single_blocks.0.") if stacked else name)
        if stacked and want:
            want = [None, *want]
        if got != want:
            wrong[name] = (got, want)
    assert len(mesh_result["all"]) > 50 and not wrong, wrong


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_worker()))
