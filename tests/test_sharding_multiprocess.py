"""Two processes x two CPU devices (gloo collectives, loopback coordinator) train like one process x four.

Each process runs this file as a script: `jax.distributed` through
`dd_jax.sharding.maybe_initialize_distributed`, a 2x2x1 (data x fsdp x tensor) mesh over the four
global devices, its own half of every global batch (as a per-host Grain shard would give it) made
global with `shard_batch`, and the LoRA train step of `dd_jax.flow` on a tiny Flux. The losses
must equal those of a single process holding all four devices and the whole batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

STEPS = 3
GLOBAL_BATCH = 4


def _worker(process_id: int, num_processes: int, port: int) -> list[float]:
    import numpy as np

    from dd_jax import sharding

    if num_processes > 1:
        assert sharding.maybe_initialize_distributed({
            "coordinator_address": f"127.0.0.1:{port}", "num_processes": num_processes, "process_id": process_id,
            "cpu_collectives": "gloo"})
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import flow, icd, lora
    from dd_jax.models import flux

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4 and jax.local_device_count() == 4 // num_processes
    params = flux.FluxParams.from_dict({**flux.PRESETS["tiny"].to_dict(), "depth": 1, "depth_single_blocks": 1})
    spec = icd.LayerSpec()
    h, w, n_txt = 2, 2, 4

    def make():
        m = flux.Flux(params, rngs=nnx.Rngs(0))
        lora.apply_lora(m, rank=4, alpha=4)
        return m

    # the same weights in every process (numpy, from a seed), filled into an abstract model
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(0)
    _, st = nnx.split(model)
    for p, v in nnx.to_flat_state(st):
        shape, name = v.get_value().shape, str(p[-1])
        value = np.zeros(shape) if name == "lora_b" else np.ones(shape) if name == "scale" else \
            rng.standard_normal(shape) * shape[0] ** -0.5
        v.set_value(jnp.asarray(value, jnp.float32))

    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    losses = []
    with jax.set_mesh(mesh):
        sharding.shard_model(model, mesh)
        opt = flow.make_optimizer(model, learning_rate=1e-2)
        sharding.shard_model(opt, mesh)
        step = flow.make_train_step(spec, guidance=3.5)
        for i in range(STEPS):
            g = np.random.default_rng(100 + i)
            f = lambda *s: g.standard_normal(s).astype(np.float32)
            full = {"layers": {n: f(GLOBAL_BATCH, h * w, params.in_channels) for n in spec.layers},
                    "txt": f(GLOBAL_BATCH, n_txt, params.context_in_dim), "y": f(GLOBAL_BATCH, params.vec_in_dim)}
            per = GLOBAL_BATCH // num_processes  # this process's shard of the global batch
            local = jax.tree.map(lambda a: a[process_id * per:(process_id + 1) * per], full)
            b = sharding.shard_batch(local, mesh)
            batch = flow.Batch(layers=b["layers"], txt=b["txt"], y=b["y"], grid=(h, w),
                               txt_ids=sharding.shard_batch(np.zeros((n_txt, 3), np.float32), mesh,
                                                            replicate=lambda p: True))
            out = step(model, opt, batch, jax.random.key(i))
            losses.append(float(out[0] if isinstance(out, tuple) else out))
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(n_proc: int, devices_per_proc: int) -> list[list[float]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(n_proc), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for i in range(n_proc)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_match_one():
    one = _run(1, 4)[0]
    two = _run(2, 2)
    assert two[0] == two[1]  # every process sees the same global loss
    for a, b in zip(two[0], one):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (two[0], one)
    assert one[-1] < one[0]  # and it trains


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pid, n, port = (int(a) for a in sys.argv[1:4])
    print(json.dumps(_worker(pid, n, port)))
