"""flux-dev LoRA (r128) ICD training on a TPU pod slice (or several slices): FSDP over all chips.

    # on every host of the slice (same command; JAX finds the other hosts):
    python -m dd_jax.train --config configs/tpu_pod.py:xray --workdir gs://bucket/runs/xray \\
        --config.model.checkpoint=... --config.autoencoder.path=... --config.data.dir=...

- Mesh: fsdp = every chip of a slice (-1); with N slices (multislice) `--config.mesh.dcn_data=N`
  replicates the FSDP group per slice and all-reduces gradients across the data-center network.
- Parameters: the frozen bf16 base (12B, 24 GB) is sharded over fsdp on its hidden dim; LoRA
  adapters and Adam moments follow it. Activations: batch over (data, fsdp).
- Batch: the global batch must be a multiple of data x fsdp (one example per chip at least);
  each host's Grain pipeline reads its own shard (shard index = process index, batch = global /
  process count) and `dd_jax.sharding.shard_batch` assembles the global array.
- Attention: Pallas splash attention; remat "proj" (projection outputs kept, attention and
  elementwise work recomputed; see docs/memory_plan.md), the scanned block layout.
"""

import importlib


def get_config(task: str = "watermark"):
    c = importlib.import_module(f"configs.{task or 'watermark'}").get_config()
    c.model.param_dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.attention = "splash"
    c.model.scan_layers = True
    c.model.remat = "proj"
    c.text.kind = "precomputed"
    c.data.batch_size = 64  # global; e.g. one per chip on a v5p-128 (64 chips)
    c.data.worker_count = 8  # Grain decode workers per host
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # --config.mesh.dcn_data=N for N slices
    c.distributed.enabled = "auto"  # TPU pods: jax.distributed finds the other hosts
    return c
