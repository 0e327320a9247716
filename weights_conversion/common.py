"""Pieces shared by the autoencoder, T5 and CLIP converters.

Those models keep their reference's module names, so most parameters map
1:1: `X.kernel` <- torch `X.weight` (transposed for Linear and Conv2d),
`X.bias` <- `X.bias`, a norm's `X.scale` <- `X.weight`, an embedding's
`X.embedding` <- `X.weight`. `write_model` streams a checked plan into a
model folder, optionally copying the model's tokenizer into it before the
folder appears under its final name.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from flax import nnx

from dd_jax.models import store
from dd_jax.models.tokenizers import TOKENIZER_DIR  # a converted text encoder's tokenizer: OUT/<component>/tokenizer
from weights_conversion import plan as planlib

if TYPE_CHECKING:
    from weights_conversion.safetensors_reader import SafetensorsReader


def flat_shapes(abstract_module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Flat parameter path -> shape of an abstract (eval_shape) NNX module, in state order."""
    _, st = nnx.split(abstract_module)
    return {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(st)}


def numbered_group(path: str, split_at: tuple[str, ...] = ()) -> str:
    """Group = the path up to its first numbered part, or up to a part named in `split_at`.

    `encoder.block.3.layer.0.SelfAttention.q.kernel` -> `encoder.block.3`;
    `encoder.final_layer_norm.scale` -> `encoder`; `shared.embedding` -> `shared`.
    """
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit() or (i > 0 and p in split_at):
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else path


GROUP_BUDGET = 64 * 2**20  # bytes (as float32) up to which a whole block is written as one group


def grouping(plan: Mapping[str, planlib.Rule], block_fn: Callable[[str], str] = numbered_group,
             budget: int = GROUP_BUDGET) -> Callable[[str], str]:
    """A group function for `plan.stream`: a block (`block_fn`) is one group when it is small, else each
    of its modules is; so conversion memory follows the largest tensor (or `budget`), not the model,
    and small models are not written as hundreds of tiny checkpoints."""
    blocks: dict[str, list[str]] = {}
    for target in plan:
        blocks.setdefault(block_fn(target), []).append(target)
    mapping = {}
    for block, targets in blocks.items():
        nbytes = 4 * sum(int(np.prod(s)) for t in targets for s in plan[t].shapes)
        for t in targets:
            mapping[t] = block if nbytes <= budget else t.rsplit(".", 1)[0]
    return mapping.__getitem__


def direct_rules(target: str, shape: tuple[int, ...], source: str) -> dict[str, planlib.Rule]:
    """Rules for one parameter whose torch tensor is `source` + `.weight`/`.bias` (see module doc)."""
    module, leaf = target.rsplit(".", 1)
    if leaf == "kernel" and len(shape) == 2:
        return {target: planlib.linear_rules(module, shape, [source])[target]}
    if leaf == "kernel" and len(shape) == 4:
        return {target: planlib.conv_rules(module, shape, source, bias=False)[target]}
    if leaf == "bias":
        return {target: planlib.copy_rule(f"{source}.bias", shape)}
    if leaf in ("scale", "embedding"):
        return {target: planlib.copy_rule(f"{source}.weight", shape)}
    raise KeyError(f"no conversion rule for parameter {target!r}")


DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def source_dtype(reader: SafetensorsReader, plan: Mapping[str, planlib.Rule]) -> np.dtype:
    """The checkpoint's dominant dtype over the tensors the plan reads (by element count)."""
    counts = collections.Counter()
    for rule in plan.values():
        for s in rule.sources:
            info = reader.info(s)
            counts[info.dtype] += int(np.prod(info.shape))
    return counts.most_common(1)[0][0]


def n_params(plan: Mapping[str, planlib.Rule]) -> int:
    return sum(int(np.prod(s)) for r in plan.values() for s in r.shapes)


def copy_tokenizer(src: str, dst: str, max_length: int | None = None) -> None:
    """Copies a tokenizer folder; `max_length` becomes its `model_max_length` (the default prompt length)."""
    shutil.copytree(src, dst)
    if max_length is not None:
        path = os.path.join(dst, "tokenizer_config.json")
        config = {}
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
        config["model_max_length"] = int(max_length)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


def write_model(reader: SafetensorsReader, plan: Mapping[str, planlib.Rule], output: str, *, model: str, config: dict,
                dtype: str | None, block_fn: Callable[[str], str] = numbered_group, overwrite: bool = False,
                progress: bool = True, tokenizer_dir: str | None = None, max_length: int | None = None,
                label: str = "", allow_non_finite: bool = False) -> str:
    """Streams `plan` into the model folder `output`; returns its path.

    `tokenizer_dir` is copied into the folder as `output/tokenizer` (see
    `copy_tokenizer`) before the folder appears under its final name. A tensor with NaN or inf values stops
    the conversion (nothing is left under `output`) unless `allow_non_finite` (`plan.stream`).
    """
    out_dtype = DTYPES[dtype] if dtype else source_dtype(reader, plan)
    if progress:
        print(f"{label or model}: {n_params(plan) / 1e6:.2f}M parameters -> {out_dtype.name}", file=sys.stderr)
    with store.GroupedWriter(output, model=model, config=config, dtype=out_dtype.name,
                             overwrite=overwrite) as writer:
        planlib.stream(plan, reader, writer, out_dtype, group_fn=grouping(plan, block_fn), progress=progress,
                       allow_non_finite=allow_non_finite)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, os.path.join(writer.tmp_dir, TOKENIZER_DIR), max_length)
        return writer.commit()
