"""flux-dev LoRA (r128) ICD training on ONE NVIDIA GPU of 80 GB or more (H20 96 GB, H100 80 GB, H200):
bf16 base, remat, cached text, cuDNN attention.

    python -m dd_jax.train --config configs/gpu_h20.py:xray --workdir runs/xray_h20 \\
        --config.model.checkpoint=ckpt/flux-dev/transformer --config.autoencoder.path=ckpt/flux-dev/vae \\
        --config.data.dir=data/alphablend

The argument after ':' is a subtask config name (default watermark, 512x512; xray, glassware, cell
train at 512x1024). The remat policy is the one docs/memory_plan.md found to fit with headroom at
the subtask's size, on the H100 (80 GB) as on the H20 (scripts/memory_plan.py recomputes it from XLA's
memory analysis); text embeddings are precomputed (text.kind "precomputed": `txt` [B, 512, 4096] and
`vec` [B, 768] in the batch), so T5-XXL and CLIP never sit in device memory.

On several GPUs of one host the same config shards the frozen base over all of them (mesh fsdp=-1)
and splits the global batch (`--config.data.batch_size` = a multiple of the GPU count).
"""

import importlib

import ml_collections

GPU_MEMORY_FRACTION = 0.9  # the JAX memory pool docs/memory_plan.md plans with (XLA_PYTHON_CLIENT_MEM_FRACTION)
# per image size: the cheapest-recompute remat policy that fits 80 GB and 96 GB GPUs (docs/memory_plan.md)
REMAT = {(512, 512): "proj", (512, 1024): "proj"}


def get_config(task: str = "watermark") -> ml_collections.ConfigDict:
    c = importlib.import_module(f"configs.{task or 'watermark'}").get_config()
    c.model.param_dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.attention = "cudnn"  # flash attention; falls back to a clear error off NVIDIA
    c.model.scan_layers = True  # one compiled double + one single block
    c.model.remat = REMAT.get((c.data.height, c.data.width), "full")
    c.text.kind = "precomputed"
    c.data.batch_size = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # several GPUs: the base sharded over all of them
    c.train.gpu_memory_fraction = GPU_MEMORY_FRACTION  # JAX's pool: 90% of the GPU, not its default 75%
    return c
