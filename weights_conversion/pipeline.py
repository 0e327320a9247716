"""Whole-pipeline conversion: a diffusers Flux folder -> one dd_jax model folder per component.

    PIPELINE_DIR/                        OUT/
      transformer/     (diffusers)  ->     transformer/   dd_jax.models.flux.load
      vae/             (diffusers)  ->     vae/           dd_jax.models.autoencoder.load
      text_encoder_2/  (T5-XXL)     ->     t5/            dd_jax.models.t5.load (+ t5/tokenizer)
      text_encoder/    (CLIP-L)     ->     clip/          dd_jax.models.clip.load (+ clip/tokenizer)
      tokenizer_2/, tokenizer/

Every requested component's checkpoint is checked against its model (names
and shapes, headers only) before anything is written; then each is streamed
group by group into a folder that appears only when complete. T5's tokenizer
gets the prompt length the pipeline uses (512 for guidance-distilled dev
models, 256 for schnell; at most the tokenizer's own) as its
`model_max_length`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence

from dd_jax.models import store
from dd_jax.models.tokenizers import T5_MAX_LENGTH
from weights_conversion import autoencoder as ae_maps, clip as clip_maps, flux as flux_maps, t5 as t5_maps
from weights_conversion.safetensors_reader import CheckpointError

COMPONENTS = ("transformer", "vae", "t5", "clip")
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "t5": "text_encoder_2", "clip": "text_encoder"}
TOKENIZERS = {"t5": "tokenizer_2", "clip": "tokenizer"}


def is_pipeline(path: str) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_index.json"))
                                    or any(os.path.isdir(os.path.join(path, s)) for s in SUBFOLDERS.values()))


def parse_components(spec: str | Iterable[str] | None) -> list[str] | None:
    if spec is None:
        return None
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise ValueError(f"unknown component(s) {unknown}; choose from {','.join(COMPONENTS)}")
    return list(dict.fromkeys(names))


def t5_max_length(pipeline_dir: str) -> int:
    """T5 prompt length: 512 with a guidance-distilled (dev) transformer, 256 with schnell (512 when
    unknown), never more than the tokenizer's own `model_max_length`."""
    length = T5_MAX_LENGTH["flux-dev"]
    path = os.path.join(pipeline_dir, "transformer", "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            length = T5_MAX_LENGTH["flux-dev" if json.load(f).get("guidance_embeds", False) else "flux-schnell"]
    path = os.path.join(pipeline_dir, TOKENIZERS["t5"], "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            own = json.load(f).get("model_max_length")
        if isinstance(own, (int, float)) and own < length:
            length = int(own)
    return length


def check_component(name: str, source: str, axes_dim: Sequence[int] | None = None) -> None:
    """Raises CheckpointError if `source` does not hold a convertible `name` checkpoint (headers only)."""
    if name == "transformer":
        flux_maps.transformer_plan(source, axes_dim=axes_dim)
    elif name == "vae":
        ae_maps.autoencoder_plan(source)
    elif name == "t5":
        t5_maps.t5_plan(source)
    elif name == "clip":
        clip_maps.clip_plan(source)
    else:
        raise ValueError(f"unknown component {name!r}")


def convert_component(name: str, source: str, output: str, dtype: str | None = None, *, overwrite: bool = False,
                      progress: bool = True, axes_dim: Sequence[int] | None = None, tokenizer_dir: str | None = None,
                      max_length: int | None = None, allow_non_finite: bool = False) -> str:
    """Converts one component checkpoint (a diffusers/transformers folder or a single file) into `output`."""
    kw = dict(overwrite=overwrite, progress=progress, allow_non_finite=allow_non_finite)
    if name == "transformer":
        return flux_maps.convert_transformer(source, output, dtype, axes_dim=axes_dim, **kw)
    if name == "vae":
        return ae_maps.convert_autoencoder(source, output, dtype, **kw)
    if name == "t5":
        return t5_maps.convert_t5(source, output, dtype, tokenizer_dir=tokenizer_dir, max_length=max_length, **kw)
    if name == "clip":
        return clip_maps.convert_clip(source, output, dtype, tokenizer_dir=tokenizer_dir, **kw)
    raise ValueError(f"unknown component {name!r}")


def convert_pipeline(source: str, output: str, components: str | Iterable[str] | None = None,
                     dtype: str | None = None, *, overwrite: bool = False, axes_dim: Sequence[int] | None = None,
                     progress: bool = True, allow_non_finite: bool = False) -> dict[str, str]:
    """Converts the pipeline's components (default: all it holds) into OUT/<component>; returns their paths."""
    source, output = os.fspath(source), os.fspath(output)
    if not is_pipeline(source):
        raise CheckpointError(f"{source}: not a diffusers pipeline folder (no model_index.json or component folders)")
    names = parse_components(components)
    if names is None:
        names = [n for n in COMPONENTS if os.path.isdir(os.path.join(source, SUBFOLDERS[n]))]
    missing = [f"{n} ({SUBFOLDERS[n]}/)" for n in names if not os.path.isdir(os.path.join(source, SUBFOLDERS[n]))]
    if missing:
        raise CheckpointError(f"{source}: the pipeline has no {', '.join(missing)}")
    if not names:
        raise CheckpointError(f"{source}: no convertible component folder ({', '.join(SUBFOLDERS.values())})")
    if not overwrite:
        exists = [os.path.join(output, n) for n in names if os.path.lexists(os.path.join(output, n))]
        if exists:
            raise FileExistsError(f"{', '.join(exists)} exist(s); pass overwrite=True (--overwrite) to replace")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output} is not a folder; choose another output")
    for n in names:  # only our own model folders are ever replaced
        store.check_replaceable(os.path.join(output, n), overwrite)
    for n in names:  # everything checked before anything is written
        check_component(n, os.path.join(source, SUBFOLDERS[n]), axes_dim)
    tokenizers = {n: os.path.join(source, d) for n, d in TOKENIZERS.items()}
    for n, d in tokenizers.items():
        if n in names and not os.path.isdir(d):
            print(f"warning: {source} has no {os.path.basename(d)}/; {n} is converted without a tokenizer",
                  file=sys.stderr)
            tokenizers[n] = None
    out = {}
    for n in names:
        out[n] = convert_component(n, os.path.join(source, SUBFOLDERS[n]), os.path.join(output, n), dtype,
                                   overwrite=overwrite, progress=progress, axes_dim=axes_dim,
                                   tokenizer_dir=tokenizers.get(n),
                                   max_length=t5_max_length(source) if n == "t5" else None,
                                   allow_non_finite=allow_non_finite)
    return out
