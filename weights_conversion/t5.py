"""T5 encoder key map: transformers `T5EncoderModel` checkpoints -> our NNX model (1:1 names).

The token embedding is `shared.weight`; checkpoints that also store the tied
copy `encoder.embed_tokens.weight` (or only that one) are accepted. Decoder
or LM-head tensors of a full T5 checkpoint are ignored.
"""

from __future__ import annotations

import json
import os

from dd_jax.models import t5 as t5_model
from dd_jax.models.t5 import T5Config
from weights_conversion import common, plan as planlib
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def build_plan(cfg: T5Config, embedding: str = "shared.weight") -> dict[str, planlib.Rule]:
    plan: dict[str, planlib.Rule] = {}
    for target, shape in common.flat_shapes(t5_model.abstract(cfg)).items():
        if target == "shared.embedding":
            plan[target] = planlib.copy_rule(embedding, shape)
        else:
            plan.update(common.direct_rules(target, shape, target.rsplit(".", 1)[0]))
    return plan


def config_from_transformers(config: dict) -> T5Config:
    proj = config.get("feed_forward_proj", "relu")
    if not proj.startswith("gated-"):
        raise CheckpointError(f"feed_forward_proj {proj!r}: only T5 v1.1's gated feed-forward is supported")
    act = config.get("dense_act_fn") or proj.split("-", 1)[1]
    if act == "gelu" and proj == "gated-gelu":
        act = "gelu_new"  # transformers maps "gated-gelu" to gelu_new
    return T5Config(
        vocab_size=config["vocab_size"], d_model=config["d_model"], d_kv=config["d_kv"], d_ff=config["d_ff"],
        num_layers=config["num_layers"], num_heads=config["num_heads"],
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6), dense_act_fn=act)


def find_t5(source: str) -> str:
    """SRC -> a transformers T5 folder: itself, or a pipeline folder's text_encoder_2/."""
    source = os.fspath(source)
    if os.path.isdir(os.path.join(source, "text_encoder_2")):
        source = os.path.join(source, "text_encoder_2")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise CheckpointError(f"{source}: not a transformers T5 folder (no config.json)")
    return source


def block(path: str) -> str:
    """`encoder.block.3.layer.1.DenseReluDense.wo.kernel` -> `encoder.block.3`; `shared.embedding` -> `shared`."""
    return common.numbered_group(path)


def t5_plan(source: str) -> tuple[SafetensorsReader, T5Config, dict[str, planlib.Rule]]:
    """(reader, T5Config, plan) for a T5 encoder checkpoint; nothing read but headers."""
    path = find_t5(source)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_transformers(json.load(f))
    reader = SafetensorsReader.open(path)
    present = [n for n in EMBEDDING_NAMES if n in reader]
    if not present:
        raise CheckpointError(f"{path}: no token embedding (expected one of {EMBEDDING_NAMES})")
    plan = build_plan(cfg, present[0])
    ignore = [n for n in EMBEDDING_NAMES if n != present[0]]
    ignore += [k for k in reader.keys() if k.startswith(_IGNORED_PREFIXES)]
    planlib.check(plan, reader, ignore=ignore)
    return reader, cfg, plan


def convert_t5(source: str, output: str, dtype: str | None = None, *, overwrite: bool = False,
               progress: bool = True, tokenizer_dir: str | None = None, max_length: int | None = None,
               allow_non_finite: bool = False) -> str:
    """Converts a T5 encoder; `tokenizer_dir` is copied in as `output/tokenizer` (with `max_length` as its
    `model_max_length` when given)."""
    reader, cfg, plan = t5_plan(source)
    return common.write_model(reader, plan, output, model="t5", config=cfg.to_dict(), dtype=dtype, block_fn=block,
                              overwrite=overwrite, progress=progress, tokenizer_dir=tokenizer_dir,
                              max_length=max_length, allow_non_finite=allow_non_finite,
                              label=f"T5 encoder ({cfg.num_layers} blocks, d_model {cfg.d_model})")
