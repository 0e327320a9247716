"""Trained LoRA adapters -> a diffusers/peft Flux LoRA file (safetensors).

Our adapters sit on BFL-named Linears (`double_blocks.3.img_attn.qkv`,
`single_blocks.7.linear1`, ...) with `lora_a` [in, r], `lora_b` [r, out] and
y += (alpha / r) x A B. diffusers' Flux LoRA files name the diffusers modules
(`transformer.transformer_blocks.3.attn.to_q.lora_A.weight` [r, in],
`...lora_B.weight` [out, r]) and `FluxTransformer2DModel.load_lora_adapter`
applies them with peft's scale lora_alpha / r, where lora_alpha defaults to r
when the file carries no alphas. So:

- names go through `weights_conversion.flux.diffusers_modules` (the table the
  base-weight conversion uses);
- a fused projection (BFL `qkv`, a single block's `linear1` = q, k, v,
  mlp-in) becomes one adapter per diffusers projection: A is shared (copied),
  B is sliced by output columns in the fused order;
- the final adaLN's output halves are swapped (BFL shift, scale -> diffusers
  scale, shift), as for its base weights;
- our scale alpha / r is folded into B, so every loader (peft's default
  alpha = r, ComfyUI, ...) reproduces our update exactly.

Sources: a training workdir (its newest trained weights, as `dd_jax.checkpoints`
chooses them for decompose: the newest checkpoint that restores or the export,
whichever is later) or an export folder (`dd_jax.checkpoints.export`); or a
live model (`from_model`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from weights_conversion.flux import _split_sizes, diffusers_modules

if TYPE_CHECKING:
    from flax import nnx

PREFIX = "transformer"
FINAL_ADALN = "final_layer.adaLN_modulation.1"
DTYPES = ("float32", "float16", "bfloat16")


class _Hidden:
    """What `_split_sizes` reads of FluxParams (the hidden size, for linear1's q/k/v/mlp split)."""

    def __init__(self, hidden_size: int):
        self.hidden_size = int(hidden_size)


def group_adapters(flat: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Flat transformer params (`...qkv.lora_a`, `...qkv.lora_b`; per block or stacked) -> {module: (A, B)}."""
    from dd_jax.models import flux  # pylint: disable=g-import-not-at-top

    flat = flux.unstack_flat({k: np.asarray(v) for k, v in flat.items() if k.endswith((".lora_a", ".lora_b"))})
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, arr in flat.items():
        module, leaf = path.rsplit(".", 1)
        out.setdefault(module, {})[leaf] = arr
    bad = [m for m, ab in out.items() if set(ab) != {"lora_a", "lora_b"}]
    if bad:
        raise KeyError(f"adapters without both lora_a and lora_b: {bad[:5]}")
    return {m: (ab["lora_a"], ab["lora_b"]) for m, ab in out.items()}


def to_diffusers(adapters: Mapping[str, tuple[np.ndarray, np.ndarray]], scale: float, *,
                 prefix: str = PREFIX, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{BFL module: (A [in, r], B [r, out])} -> diffusers/peft tensors ([r, in] / [out, r]), scale folded into B."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {DTYPES}")
    if dtype == "bfloat16":
        import ml_dtypes  # pylint: disable=g-import-not-at-top

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    pre = f"{prefix}." if prefix else ""
    tensors: dict[str, np.ndarray] = {}
    for module, (a, b) in adapters.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{module}: LoRA shapes A {a.shape}, B {b.shape} do not chain")
        try:
            names = diffusers_modules(module)
        except KeyError as e:
            raise KeyError(f"LoRA on {module!r} has no diffusers counterpart") from e
        a32 = np.asarray(a, np.float32)
        b32 = np.asarray(b, np.float32) * np.float32(scale)
        if module == FINAL_ADALN:  # (shift, scale) -> (scale, shift)
            half = b32.shape[1] // 2
            b32 = np.concatenate([b32[:, half:], b32[:, :half]], axis=1)
        if len(names) > 1:
            # linear1's input is the hidden state, so its in_features give the q/k/v width
            sizes = _split_sizes(module, b32.shape[1], len(names), _Hidden(a32.shape[0]))
            if sum(sizes) != b32.shape[1] or min(sizes) <= 0:
                raise ValueError(f"{module}: cannot split {b32.shape[1]} outputs into {names}")
            pieces = np.split(b32, np.cumsum(sizes)[:-1], axis=1)
        else:
            pieces = [b32]
        for name, piece in zip(names, pieces):
            tensors[f"{pre}{name}.lora_A.weight"] = np.ascontiguousarray(a32.T).astype(np_dtype)
            tensors[f"{pre}{name}.lora_B.weight"] = np.ascontiguousarray(piece.T).astype(np_dtype)
    return tensors


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(dict(tensors), path, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def _metadata(rank: int, alpha: float, n_modules: int, source: str) -> dict[str, str]:
    return {"format": "pt", "dd_jax_lora": json.dumps({"rank": rank, "alpha": alpha, "scale_folded_into_lora_B": True,
                                                       "modules": n_modules, "source": source})}


def from_model(transformer: nnx.Module, path: str, *, dtype: str = "float32", prefix: str = PREFIX) -> str:
    """Exports the LoRA adapters of a live Flux model (`dd_jax.lora.apply_lora`)."""
    from dd_jax import lora  # pylint: disable=g-import-not-at-top

    layers = lora.lora_layers(transformer)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    flat = {}
    for name, layer in layers:  # each layer's own scale folded into its B
        flat[f"{name}.lora_a"] = np.asarray(layer.lora_a[...], np.float32)
        flat[f"{name}.lora_b"] = np.asarray(layer.lora_b[...], np.float32) * np.float32(layer.scale)
    adapters = group_adapters(flat)
    tensors = to_diffusers(adapters, 1.0, prefix=prefix, dtype=dtype)
    rank = layers[0][1].rank
    return save(path, tensors, _metadata(rank, rank * layers[0][1].scale, len(adapters), "model"))


# ------------------------------------------------------------------ training runs
def read_run(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(flat trainable params, config dict over configs/base.py) of an export folder or a training workdir
    (`dd_jax.checkpoints`)."""
    from dd_jax import checkpoints  # pylint: disable=g-import-not-at-top  (JAX and orbax only when reading a run)

    return checkpoints.read_trained_flat(path)


def export_run(checkpoint: str, output: str, *, dtype: str = "float32", prefix: str = PREFIX) -> dict:
    """Writes the LoRA of a training run as a diffusers/peft Flux LoRA file; returns a summary."""
    flat, config = read_run(checkpoint)
    lora_cfg = config["lora"]  # complete: read_run merges the saved config over configs/base.py
    if not lora_cfg["enabled"]:
        raise ValueError(f"{checkpoint}: the run trained without LoRA (lora.enabled is false); nothing to export")
    transformer = {k[len("transformer."):]: v for k, v in flat.items() if k.startswith("transformer.")}
    adapters = group_adapters(transformer)
    if not adapters:
        raise ValueError(f"{checkpoint}: no LoRA parameters found")
    ranks = {a.shape[1] for a, _ in adapters.values()}
    rank, alpha = int(lora_cfg["rank"]), float(lora_cfg["alpha"] or lora_cfg["rank"])
    if ranks != {rank}:
        raise ValueError(f"{checkpoint}: adapters have rank(s) {sorted(ranks)}, the config says {rank}")
    tensors = to_diffusers(adapters, alpha / rank, prefix=prefix, dtype=dtype)
    save(output, tensors, _metadata(rank, alpha, len(adapters), os.path.abspath(checkpoint)))
    blocks = sorted({re.sub(r"\.\d+\.", ".N.", m) for m in adapters})
    return {"output": output, "modules": len(adapters), "tensors": len(tensors), "rank": rank, "alpha": alpha,
            "kinds": blocks}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    ap = argparse.ArgumentParser(prog="python scripts/export_lora.py",
                                 description="Export a run's LoRA as a diffusers/peft Flux LoRA (safetensors).")
    ap.add_argument("--checkpoint", required=True, help="training workdir or its export/ folder")
    ap.add_argument("--output", required=True, help="the .safetensors file to write")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--prefix", default=PREFIX, help="key prefix (diffusers pipelines: 'transformer')")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.checkpoint, args.output, dtype=args.dtype, prefix=args.prefix)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out['output']}: {out['modules']} LoRA modules -> {out['tensors']} tensors (rank {out['rank']}, "
          f"alpha {out['alpha']:g}, scale folded into lora_B)", file=sys.stderr)
    return 0
