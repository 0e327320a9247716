"""LoRA fine-tuning of a real, converted Flux: `--config=configs/flux.py[:dev|schnell|kontext]`.

The three FLUX.1 variants share one architecture; they differ in the
guidance embedding (dev and Kontext-dev are guidance-distilled, schnell is
not), T5 prompt length (512 / 256, read from the converted tokenizer) and
sampling defaults. Point `model.weights` at the --output folder of
`scripts/convert_flux.py` (transformer/, vae/, t5/, clip/) and encode the
data's captions once:

    python scripts/convert_flux.py --source /models/FLUX.1-dev --output /models/flux-dev-jax
    python -m dd_jax.data.encode_text --data data/ab --encoders /models/flux-dev-jax
    python -m dd_jax.train --config=configs/flux.py:dev --workdir runs/flux-xray \
        --config.model.weights=/models/flux-dev-jax --config.data.dir=data/ab --config.data.tasks=xray
    python -m dd_jax.decompose --checkpoint runs/flux-xray --input photos --output out
    python scripts/export_lora.py --checkpoint runs/flux-xray --output xray_lora.safetensors

Training reads the T5/CLIP embeddings from DATA_DIR/text_cache (no T5 on the
accelerator); decomposition takes each task's prompt from the cache (or
encodes it with text.encoders, default model.weights).
"""

from configs import base

VARIANTS = {  # preset, sampling steps (the guidance-embedding input, train.guidance, is used by dev and Kontext)
    "dev": ("flux-dev", 28),
    "kontext": ("flux-kontext-dev", 28),
    "schnell": ("flux-schnell", 4),
}


def get_config(variant: str = "dev"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown Flux variant {variant!r}; choose from {sorted(VARIANTS)}")
    preset, steps = VARIANTS[variant]
    c = base.get_config()  # base's model.weights, Flux VAE, precomputed text, each task's prompt
    c.model.preset = preset  # the architecture; the converted checkpoint's own config wins when loading
    c.sample.steps = steps
    return c
