#!/usr/bin/env python
"""What each speed change does to the compiled programs, measured without a GPU (docs/speed.md).

    python scripts/speed_evidence.py [--blocks 1,1] [--size 512] [--json OUT]

Builds flux-dev's widths (hidden 3072, 24 heads of 128) with `--blocks` double,single blocks, bf16, LoRA r128,
on a 3-layer ICD sequence at `--size` plus 512 text tokens, abstract (nothing allocated), and compiles for this
machine's CPU:
- the sampler step with LoRA adapters, folded (`lora.merge_lora`, what decompose runs), folded with RoPE after
  the q/k norm (`model.rope_in_norm=False`), and folded with fp8_w8a8 weights (`dd_jax.quantize`);
- the train step (remat proj) with RoPE inside and after the q/k norm.
For each it prints XLA's FLOPs, bytes accessed, temp bytes and top-level op counts (`dd_jax.hlo_stats`) with
ratios to the first row, and the lowered program's matmul count (and how many are float8 x float8).
XLA:CPU runs bf16 matmuls in float32 and fuses differently from XLA:GPU: compare rows, not platforms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="1,1", help="double,single blocks (flux-dev has 19,38)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (16 px a token per layer)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    depth, single = (int(x) for x in args.blocks.split(","))

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import benchmark as bm, hlo_stats, lora, quantize, sampling
    from dd_jax.models import flux

    bargs = bm.parse_args(["--preset", "flux-dev", "--height", str(args.size), "--width", str(args.size), "--txt",
                           "512", "--lora-rank", "128", "--dtype", "bfloat16", "--remat", "proj", "--compile-only"])
    params = dataclasses.replace(flux.PRESETS["flux-dev"], depth=depth, depth_single_blocks=single)
    x = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16 if k in ("img", "txt", "y") else v.dtype)
         for k, v in bm.host_inputs(bargs, params).items()}
    spec, batch, (cond, txt, vec) = bm.production_inputs(bargs, params, x)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def model(merged=False, rope_in_norm=True, qtype="", remat="none"):
        def make():
            m = flux.Flux(params, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, remat=remat,
                          rope_in_norm=rope_in_norm)
            lora.apply_lora(m, 128, 128, rngs=nnx.Rngs(1))
            if merged:
                lora.merge_lora(m)
            quantize.quantize_module(m, qtype, quantize.FLUX_TARGETS)
            return m

        return nnx.eval_shape(make)

    def measured(lowered):
        row = hlo_stats.of(lowered.compile())
        text = lowered.as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        row["lowered_dots"] = len(dots)
        row["lowered_f8_dots"] = sum("f8E4M3FN>, tensor<" in line for line in dots)
        return row

    sample = {}
    for name, kw in (("lora", {}), ("merged", dict(merged=True)),
                     ("merged_rope_after_norm", dict(merged=True, rope_in_norm=False)),
                     ("merged_fp8_w8a8", dict(merged=True, qtype="fp8_w8a8"))):
        print(f"sampler: {name}", file=sys.stderr, flush=True)
        sample[name] = measured(sampling.lower_sample(model(**kw), spec, cond, txt, vec, key, batch.grid, 1, 3.5))
    step, make_opt = bm.production_steps(spec)
    train = {}
    for name, kw in (("rope_in_norm", {}), ("rope_after_norm", dict(rope_in_norm=False))):
        print(f"train step: {name}", file=sys.stderr, flush=True)
        m = model(remat="proj", **kw)
        train[name] = measured(step.lower(m, nnx.eval_shape(lambda m=m: make_opt(m)), batch, key))
    for title, rows, base in (("sampler step", sample, "lora"), ("train step (remat proj)", train, "rope_in_norm")):
        print(f"\n{title}, flux-dev widths, {depth}+{single} blocks, {args.size}x{args.size} ICD, bf16, LoRA r128")
        print(hlo_stats.compare(rows, base))
        print("lowered matmuls (float8 x float8): " + ", ".join(
            f"{k} {v['lowered_dots']} ({v['lowered_f8_dots']})" for k, v in rows.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sample": sample, "train": train}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
