#!/usr/bin/env python
"""How far weight-only quantization (dd_jax.quantize) moves a random Flux's output from the bf16 model's.

    python scripts/quantize_accuracy.py [--models tiny,mid] [--grid 8] [--seed 0]

For each model (random init, bf16 parameters and compute; `tiny` = the `tiny` preset, hidden 64, 2+2 blocks;
`mid` = hidden 512, 8 heads, 4 double + 8 single blocks) and each of int8, fp8, int4 (the same bf16 weights
quantized), on an ICD sequence of 3 image layers of grid x grid tokens + 32 text tokens:
- transformer: ||out_q - out_bf16|| / ||out_bf16|| of one forward pass (t = 0.5, random inputs);
- decomposition: the same for the two target layers after a 2-step Euler decomposition (`sampling.sample`,
  same noise), i.e. what decompose returns before the VAE.
For scale, the first row of each model is the float32-computed model against bf16 (bf16's own rounding).
Prints a markdown table (docs/quantize.md).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {
    "tiny": {},
    "mid": dict(hidden_size=512, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(16, 24, 24),
                vec_in_dim=256, context_in_dim=256),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dd_jax import icd, quantize, sampling
    from dd_jax.models import flux

    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                             / np.linalg.norm(np.asarray(b, np.float64)))
    spec = icd.LayerSpec(condition="z", targets=("x", "y"))
    print("| model | parameters | weights | transformer output rel. error | 2-step decomposition rel. error |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        p = flux.FluxParams(**{**flux.PRESETS["tiny"].to_dict(), **MODELS[name]})
        ref = flux.Flux(p, rngs=nnx.Rngs(args.seed), param_dtype=jnp.bfloat16)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(ref)))
        rng = np.random.default_rng(args.seed)
        g = args.grid
        n = g * g
        img = jnp.asarray(rng.standard_normal((1, 3 * n, p.in_channels)), jnp.float32)
        ids = jnp.asarray(icd.position_ids(spec, g, g))
        txt = jnp.asarray(rng.standard_normal((1, 32, p.context_in_dim)), jnp.float32)
        vec = jnp.asarray(rng.standard_normal((1, p.vec_in_dim)), jnp.float32)
        cond = img[:, :n]
        fwd = nnx.jit(lambda m: m(img, ids, txt, jnp.zeros((32, 3)), jnp.array([0.5]), vec, jnp.array([3.5])))

        def decomp(m):
            out = sampling.sample(m, spec, cond, txt, vec, jax.random.key(args.seed + 1), (g, g), 2, 3.5)
            return np.concatenate([np.asarray(out[k], np.float32) for k in spec.targets], axis=1)

        ref_out, ref_dec = fwd(ref), decomp(ref)
        f32 = nnx.clone(ref)
        for _, mod in nnx.iter_graph(f32):  # the same bf16 weights, activations and matmuls in float32
            if isinstance(mod, nnx.Module) and getattr(mod, "dtype", None) == jnp.bfloat16:
                mod.dtype = jnp.float32
        print(f"| {name} | {n_params / 1e6:.1f}M | bf16 computed in float32 | {rel(fwd(f32), ref_out):.2e} | "
              f"{rel(decomp(f32), ref_dec):.2e} |")
        for q in quantize.QTYPES:
            m = nnx.clone(ref)
            quantize.quantize_module(m, q, quantize.FLUX_TARGETS)
            print(f"| {name} | {n_params / 1e6:.1f}M | {q} | {rel(fwd(m), ref_out):.2e} | "
                  f"{rel(decomp(m), ref_dec):.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
