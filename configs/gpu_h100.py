"""flux-dev LoRA (r128) ICD training on ONE NVIDIA H100 (80 GB): as configs/gpu_h20.py, remat per its memory.

    python -m dd_jax.train --config configs/gpu_h100.py:watermark --workdir runs/wm_h100 ...

On several GPUs of one host the same config shards the frozen base over all of them (mesh fsdp=-1)
and splits the global batch (`--config.data.batch_size` = a multiple of the GPU count).
"""

from configs import gpu_h20

DEVICE_MEMORY_GB = 80
REMAT = {(512, 512): "proj", (512, 1024): "proj"}


def get_config(task: str = "watermark"):
    return gpu_h20.gpu_config(task, REMAT)
