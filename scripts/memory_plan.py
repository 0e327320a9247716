#!/usr/bin/env python
"""Memory plan for flux-dev LoRA ICD training on one GPU, from XLA's memory analysis of the compiled step.

    python scripts/memory_plan.py [--devices h20,h100] [--sizes 512x512,512x1024] \\
        [--policies none,dots_no_batch,attn,full] [--markdown docs/memory_plan.md] [--json out.json]

For every (image size, remat policy) the paper's training step (configs/gpu_h20.py: flux-dev + LoRA
r128 on every attention/MLP projection, bf16 base, ICD with 3 image layers + 512 cached text tokens,
the Flux VAE encoding the three images inside the step, AdamW) is compiled ahead of time on
abstract shapes (`dd_jax.aot`; nothing is allocated) and XLA's memory analysis gives the bytes of
arguments (weights, optimizer state, batch), temporaries and outputs. The step donates its state, so
the peak is about arguments + temporaries (+ outputs not aliased to inputs).

Caveats, printed with the table: the analysis comes from the backend this script runs on. On a
CPU-only machine the step is compiled for XLA:CPU with the XLA attention kernel, which holds
[batch, heads, L, L] attention probabilities; cuDNN flash attention on the GPU never does, so
the CPU figures are an upper bound by about that much (the "with cuDNN" column subtracts those buffers:
one block's probabilities in bf16 plus its float32 logits, or every block's probabilities for `none`). XLA:CPU also computes bfloat16 matmuls in float32
(converting whole stacked weights), so off-GPU the temporaries are estimated from a float32 compile
of the same step, halved. Run it on the GPU itself for exact figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEVICES = {"h20": ("NVIDIA H20", 96e9), "h100": ("NVIDIA H100 SXM", 80e9)}
SIZES = {"512x512": "watermark", "512x1024": "xray"}
HEADROOM = 0.9  # plan to use at most 90% of device memory (allocator fragmentation, cuDNN workspaces)


def _compile(size: str, policy: str, txt_len: int, dtype: str | None = None, scan: bool = True, compile=True):
    import jax

    from configs import gpu_h20
    from dd_jax import aot

    config = gpu_h20.get_config(SIZES[size])
    if jax.default_backend() != "gpu":
        config.model.attention = "xla"  # cuDNN cannot compile here; see the caveat
    config.model.remat = policy
    config.model.scan_layers = scan
    if dtype:
        config.model.param_dtype = config.model.compute_dtype = dtype
    return config, aot.compile_train_step(config, txt_len=txt_len, compile=compile)


def plan_one(size: str, policy: str, txt_len: int = 512) -> dict:
    """XLA's memory analysis of the bf16 step (arguments: exact; temporaries: see below) and its FLOPs.

    On a non-GPU backend XLA keeps bfloat16 matmuls in float32 and converts whole stacked weights,
    which inflates the temporaries; there the activation temporaries are estimated from a float32
    compile of the same step, halved (bf16 activations), plus the float32 LoRA gradients.
    """
    import jax

    t0 = time.time()
    config, r = _compile(size, policy, txt_len)
    m = r.memory
    out = {"size": size, "remat": policy, "tokens": r.tokens, "backend": jax.default_backend(),
           "attention": config.model.attention, "argument_bytes": int(m.argument_size_in_bytes),
           "temp_bytes_bf16_compile": int(m.temp_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "trainable_params": r.trainable_params,
           "total_params": r.total_params, "attn_l2_bytes": 24 * r.tokens**2 * (2 + 4)}
    if out["backend"] == "gpu":
        out["temp_bytes"] = out["temp_bytes_bf16_compile"]
    else:
        _, r32 = _compile(size, policy, txt_len, dtype="float32")
        out["temp_bytes_f32_compile"] = int(r32.memory.temp_size_in_bytes)
        out["temp_bytes"] = out["temp_bytes_f32_compile"] // 2 + 2 * r.trainable_params
    # XLA counts a while loop's body once: FLOPs from the unscanned program (lowered, not compiled)
    _, flat = _compile(size, policy, txt_len, scan=False, compile=False)
    out["flops"] = flat.flops
    out["compile_s"] = round(time.time() - t0, 1)
    out["peak_bytes"] = out["argument_bytes"] + out["temp_bytes"] + max(0, out["output_bytes"] - out["alias_bytes"])
    return out


def choose(rows: list[dict], capacity: float) -> dict[str, str]:
    """Per size: among the policies whose peak fits in HEADROOM * capacity, the least recomputation
    (FLOPs per step; within 2% of the least, the smaller peak)."""
    best = {}
    for size in sorted({r["size"] for r in rows}):
        fits = [r for r in rows if r["size"] == size and r["peak_bytes"] <= HEADROOM * capacity]
        if not fits:
            best[size] = "does not fit"
            continue
        least = min(r["flops"] for r in fits)
        near = [r for r in fits if r["flops"] <= 1.02 * least]
        best[size] = min(near, key=lambda r: r["peak_bytes"])["remat"]
    return best


def cudnn_saving(r: dict, depth: int = 19 + 38, heads: int = 24) -> int:
    """Attention buffers the XLA kernel holds and flash attention does not: every block's bf16
    probabilities when nothing is rematerialised, else one block's probabilities + float32 logits."""
    per_block = heads * r["tokens"] ** 2
    return depth * per_block * 2 if r["remat"] == "none" else per_block * (2 + 4)


def markdown(rows: list[dict], devices: list[str]) -> str:
    gb = lambda b: f"{b / 1e9:.1f}"
    r0 = rows[0]
    lines = [
        "# Memory plan: flux-dev LoRA ICD training on one GPU",
        "",
        "Generated by `python scripts/memory_plan.py` from XLA's memory analysis of the compiled training step",
        f"(backend: {r0['backend']}, attention kernel compiled: {r0['attention']}). Model: flux-dev "
        f"({r0['total_params'] / 1e9:.2f}B parameters incl. the VAE, bf16), LoRA r128 on every attention and MLP "
        f"projection ({r0['trainable_params'] / 1e6:.0f}M float32 parameters, AdamW), ICD with 3 image layers + 512 "
        "cached text tokens (T5/CLIP not on the device), the VAE encoding the 3 images inside the step, batch 1, "
        "scanned blocks.",
        "",
        "| image size | tokens | remat | arguments GB | temporaries GB | peak GB | peak with cuDNN attention GB (est.) "
        "| TFLOP/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cudnn = r["peak_bytes"] if r["backend"] == "gpu" else r["peak_bytes"] - cudnn_saving(r)
        lines.append(f"| {r['size']} | {r['tokens']} | {r['remat']} | {gb(r['argument_bytes'])} | {gb(r['temp_bytes'])} "
                     f"| {gb(r['peak_bytes'])} | {gb(cudnn)} | {(r['flops'] or 0) / 1e12:.1f} |")
    lines += ["", "Chosen remat policy (the least recomputation, i.e. FLOPs per step, whose peak (the XLA figure, an "
              f"upper bound off-GPU) fits in {int(HEADROOM * 100)}% of device memory; within 2% of those FLOPs, "
              "the smaller peak):", ""]
    for d in devices:
        name, cap = DEVICES[d]
        lines.append(f"- {name} ({cap / 1e9:.0f} GB): " + ", ".join(f"{s}: `{p}`" for s, p in choose(rows, cap).items()))
        if rows[0]["backend"] != "gpu":
            est = [dict(r, peak_bytes=r["peak_bytes"] - cudnn_saving(r)) for r in rows]
            alt = {k: v for k, v in choose(est, cap).items() if v != choose(rows, cap)[k]}
            if alt:
                lines.append(f"  - with the cuDNN estimate instead: " + ", ".join(f"{s}: `{p}`" for s, p in alt.items())
                             + " (to confirm on the GPU)")
    if r0["backend"] != "gpu":
        lines += ["", "Caveat: compiled for XLA:CPU, not the GPU. The CPU step uses the XLA attention kernel, which "
                  "materialises [heads, L, L] attention probabilities; cuDNN flash attention (the GPU configs) does "
                  "not, so on the GPU the peak is lower: the \"with cuDNN\" column subtracts one block's [heads, L, L] "
                  "probabilities (bf16) and logits (float32) for remat policies that recompute attention, and every "
                  "block's probabilities for `none`. XLA:CPU computes bfloat16 matmuls in float32, so the temporaries are estimated as "
                  "half of a float32 compile's (plus the float32 LoRA gradients); arguments are exact. Re-run the "
                  "script on "
                  "the GPU for exact figures (`python scripts/memory_plan.py` there compiles with cuDNN)."]
    lines += ["", "`configs/gpu_h20.py` and `configs/gpu_h100.py` use the chosen policies (`configs/tpu_pod.py` uses "
              "`proj` as well: with FSDP over a slice the base and optimizer state divide by the chip count, "
              "while activations per chip stay those of one example)."]
    lines += ["", "Remat policies (`dd_jax.models.flux.REMAT_POLICIES`): `none` keeps every intermediate; `dots` keeps "
              "every matmul output; `dots_no_batch` keeps every matmul output but attention's (with LoRA: the base "
              "and the adapter products separately); `proj` keeps each projection's summed output; `attn` "
              "keeps q/k/v and the attention output and recomputes the MLPs; `offload` moves q/k/v, attention "
              "output and MLP hidden to pinned host memory; `full` keeps only each block's input."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="h20,h100")
    ap.add_argument("--sizes", default="512x512,512x1024")
    ap.add_argument("--policies", default="none,dots_no_batch,proj,attn,full")
    ap.add_argument("--markdown", default=None, help="write the table here (e.g. docs/memory_plan.md)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="rebuild the table from a --json file (no compiling)")
    args = ap.parse_args(argv)
    rows = []
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    for size in ([] if args.from_json else args.sizes.split(",")):
        for policy in args.policies.split(","):
            r = plan_one(size, policy)
            rows.append(r)
            print(f"{size} remat={policy}: peak {r['peak_bytes'] / 1e9:.1f} GB (arguments "
                  f"{r['argument_bytes'] / 1e9:.1f}, temporaries {r['temp_bytes'] / 1e9:.1f}), "
                  f"{(r['flops'] or 0) / 1e12:.1f} TFLOP, compiled in {r['compile_s']}s", flush=True)
    devices = args.devices.split(",")
    for d in devices:
        print(f"{DEVICES[d][0]}: {choose(rows, DEVICES[d][1])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
