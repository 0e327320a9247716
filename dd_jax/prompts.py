"""Decomposition prompts, encoded before the transformer is built: T5 and the transformer are never resident together.

A real Flux (`text.kind` "precomputed") conditions decomposition on each task's prompt
(`dd_jax.data.blend.task_prompt`, or `sample.prompt`). `dd_jax.system.build` calls `encode_first(config)`
before it reads the transformer: the prompts the text cache holds are read from it; the others are encoded
with the converted T5 and CLIP (`text.encoders`, else `model.weights`), T5 quantized as the build's
`model.quantize` (`dd_jax.quantize.load_t5`), and both encoders are dropped before the transformer loads.
So a decomposition holds the encoders' weights only while it encodes, and holds the transformer only after.

A prompt that is asked for later and is in neither (e.g. `decompose --prompt` with a new text, which the
build cannot know) is encoded when it is asked for: T5 is then loaded beside the transformer for that call
only, and dropped again. Put such a prompt in the cache first to avoid it
(`python -m dd_jax.data.encode_text --data DATA_DIR --encoders CONVERTED_DIR --prompt TEXT`).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from flax import nnx

from dd_jax import quantize
from dd_jax.data import blend, text_cache

if TYPE_CHECKING:
    import ml_collections

Row = tuple[np.ndarray, np.ndarray]  # (txt [L, C], vec [P]) float32


def encode(encoders: str, prompts: Sequence[str], qtype: str = "", batch_size: int = 8) -> dict[str, Row]:
    """Encodes `prompts` with the converted T5 (quantized `qtype`) and CLIP of `encoders` (a converted pipeline
    folder), in fixed-size batches as `text_cache.TextEncoder` does; the encoders are dropped on return."""
    from dd_jax.models import clip, tokenizers

    prompts = list(dict.fromkeys(str(p) for p in prompts))
    if not prompts:
        return {}
    t5_dir, clip_dir = text_cache.find_encoders(encoders)
    t5_tok, clip_tok = tokenizers.load_t5_tokenizer(t5_dir, None), tokenizers.load_clip_tokenizer(clip_dir)
    t5_model, clip_model = quantize.load_t5(t5_dir, qtype), clip.load(clip_dir)

    @nnx.jit
    def run(t5_m, clip_m, t5_ids, clip_ids):
        return t5_m(t5_ids), clip_m(clip_ids)[1]

    out = {}
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            txt, vec = run(t5_model, clip_model, t5_tok(padded).input_ids, clip_tok(padded).input_ids)
            txt, vec = np.asarray(txt, np.float32), np.asarray(vec, np.float32)
            out.update({p: (txt[i], vec[i]) for i, p in enumerate(chunk)})
    finally:
        del t5_model, clip_model, run
        gc.collect()  # the encoders' device buffers go now, before anything else is loaded
    return out


class Prompts:
    """`prompts -> (txt [N, L, C], vec [N, P])` float32 numpy: from the rows encoded so far, else the text cache,
    else encoded on the spot (T5 quantized `qtype`, then dropped); without encoders, the cache's error."""

    def __init__(self, conditioning: text_cache.PromptConditioning, rows: dict[str, Row] | None = None,
                 qtype: str = ""):
        self.conditioning, self.rows, self.qtype = conditioning, dict(rows or {}), qtype

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Prompts:
        return cls(text_cache.PromptConditioning.from_config(config), qtype=quantize.configured(config))

    def needed(self, prompts: Sequence[str]) -> list[str]:
        """Of `prompts`, those neither encoded yet nor in the cache (these read from it on the way)."""
        cache = self.conditioning.cache
        missing = []
        for p in dict.fromkeys(prompts):
            if p in self.rows:
                continue
            if cache is not None and p in cache:
                self.rows[p] = cache[p]
            else:
                missing.append(p)
        return missing

    def add(self, prompts: Sequence[str]) -> None:
        """Makes `prompts` available: read from the cache, or encoded (raises the cache's one-line error when
        some are in neither and no encoders are configured)."""
        missing = self.needed(prompts)
        if missing and self.conditioning.encoders is None:
            self.conditioning(missing)  # raises: no embedding for the prompt, and how to add one
        if missing:
            self.rows.update(encode(self.conditioning.encoders, missing, self.qtype))

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.add(prompts)
        return np.stack([self.rows[p][0] for p in prompts]), np.stack([self.rows[p][1] for p in prompts])


def decomposition_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """The prompts a decomposition may ask for: `sample.prompt`, else every task's."""
    return [config.sample.prompt] if config.sample.prompt else [blend.task_prompt(t) for t in blend.TASKS]


def encode_first(config: ml_collections.ConfigDict) -> Prompts | None:
    """For a T5/CLIP-conditioned config: the decomposition prompts read from the cache and the rest encoded now
    (the encoders loaded and dropped here, before the caller builds the transformer); None for other configs.
    Without encoders the missing prompts are left (an error only if one is asked for)."""
    if config.text.kind != "precomputed":
        return None
    prompts = Prompts.from_config(config)
    missing = prompts.needed(decomposition_prompts(config))
    if missing and prompts.conditioning.encoders is not None:
        prompts.add(missing)
    return prompts
