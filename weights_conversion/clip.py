"""CLIP text encoder key map: transformers `CLIPTextModel` checkpoints -> our NNX model (1:1 names).

Older checkpoints (Flux's `text_encoder/`, saved by transformers 4) put
every name under `text_model.`; transformers 5 saves without it. Both are
accepted, and so are the tensors a full CLIP or a `CLIPTextModelWithProjection`
adds (vision tower, projections, `logit_scale`, the `position_ids` buffer),
which are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection

from dd_jax.models import clip as clip_model
from dd_jax.models.clip import CLIPTextConfig
from weights_conversion import common, plan as planlib
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

PREFIXES = ("text_model.", "")
_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def build_plan(cfg: CLIPTextConfig, prefix: str = "") -> dict[str, planlib.Rule]:
    plan: dict[str, planlib.Rule] = {}
    for target, shape in common.flat_shapes(clip_model.abstract(cfg)).items():
        plan.update(common.direct_rules(target, shape, prefix + target.rsplit(".", 1)[0]))
    return plan


def config_from_transformers(config: dict) -> CLIPTextConfig:
    """Missing fields take transformers' CLIPTextConfig defaults (eos_token_id: transformers 5's 49407)."""
    if "text_config" in config:  # a full CLIPConfig
        config = config["text_config"]
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408), hidden_size=config.get("hidden_size", 512),
        intermediate_size=config.get("intermediate_size", 2048),
        num_hidden_layers=config.get("num_hidden_layers", 12), num_attention_heads=config.get("num_attention_heads", 8),
        max_position_embeddings=config.get("max_position_embeddings", 77),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5), hidden_act=config.get("hidden_act", "quick_gelu"),
        eos_token_id=config.get("eos_token_id", 49407))


def find_clip(source: str) -> str:
    """SRC -> a transformers CLIP text folder: itself, or a pipeline folder's text_encoder/."""
    source = os.fspath(source)
    if os.path.isdir(os.path.join(source, "text_encoder")):
        source = os.path.join(source, "text_encoder")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise CheckpointError(f"{source}: not a transformers CLIP folder (no config.json)")
    return source


def detect_prefix(names: Collection[str]) -> str:
    for p in PREFIXES:
        if f"{p}embeddings.token_embedding.weight" in names:
            return p
    raise CheckpointError("no CLIP token embedding found (expected 'text_model.embeddings.token_embedding.weight' "
                          "or 'embeddings.token_embedding.weight')")


def block(path: str) -> str:
    """`encoder.layers.3.mlp.fc1.kernel` -> `encoder.layers.3`; `final_layer_norm.scale` -> `final_layer_norm`."""
    return common.numbered_group(path)


def clip_plan(source: str) -> tuple[SafetensorsReader, CLIPTextConfig, dict[str, planlib.Rule]]:
    """(reader, CLIPTextConfig, plan) for a CLIP text checkpoint; nothing read but headers."""
    path = find_clip(source)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_transformers(json.load(f))
    reader = SafetensorsReader.open(path)
    prefix = detect_prefix(set(reader.keys()))
    plan = build_plan(cfg, prefix)
    ignore = [k for k in reader.keys() if k.startswith(_IGNORED) or k.endswith("position_ids")]
    planlib.check(plan, reader, ignore=ignore)
    return reader, cfg, plan


def convert_clip(source: str, output: str, dtype: str | None = None, *, overwrite: bool = False,
                 progress: bool = True, tokenizer_dir: str | None = None, allow_non_finite: bool = False) -> str:
    """Converts a CLIP text encoder; `tokenizer_dir` is copied in as `output/tokenizer`."""
    reader, cfg, plan = clip_plan(source)
    return common.write_model(reader, plan, output, model="clip", config=cfg.to_dict(), dtype=dtype, block_fn=block,
                              overwrite=overwrite, progress=progress, tokenizer_dir=tokenizer_dir,
                              allow_non_finite=allow_non_finite,
                              label=f"CLIP text encoder ({cfg.num_hidden_layers} layers, width {cfg.hidden_size})")
