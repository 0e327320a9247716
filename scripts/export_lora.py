#!/usr/bin/env python
"""Exports a training run's LoRA as a diffusers/peft Flux LoRA file. See --help.

  python scripts/export_lora.py --checkpoint RUN --output lora.safetensors [--dtype bfloat16]

The file loads with `FluxPipeline.load_lora_weights(...)` or
`FluxTransformer2DModel.load_lora_adapter(..., prefix="transformer")`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weights_conversion.lora_export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
