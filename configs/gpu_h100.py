"""flux-dev LoRA (r128) ICD training on ONE NVIDIA H100 (80 GB): configs/gpu_h20.py, whose remat table
(docs/memory_plan.md) fits 80 GB as well.

    python -m dd_jax.train --config configs/gpu_h100.py:watermark --workdir runs/wm_h100 ...
"""

from configs.gpu_h20 import get_config  # noqa: F401  (one config, one table, for both GPUs)
