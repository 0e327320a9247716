#!/usr/bin/env python
"""Memory plan for flux-dev LoRA ICD training on one accelerator, from XLA's memory analysis of the production step.

    python scripts/memory_plan.py [--devices h20,h100,h200,v5p] [--sizes 512x512,512x1024] \\
        [--policies proj,full] [--rows rows.jsonl] [--markdown docs/memory_plan.md] [--from-rows rows.jsonl]

For every (image size, remat policy) the training step `dd_jax.train` runs (`train.make_step`, compiled by
`dd_jax.aot` on abstract shapes: nothing is allocated) for the paper's setting (configs/gpu_h20.py: flux-dev +
LoRA r128 on every attention/MLP projection, bf16 base, ICD with 3 image layers + 512 cached text tokens, the
Flux VAE encoding the three images inside the step, AdamW) is compiled and XLA's memory analysis gives the
bytes of arguments (weights, optimizer state, batch), outputs, outputs aliased to (donated) inputs and
temporaries. The step donates the LoRA parameters and the optimizer state and takes the frozen base
read-only, so the peak is arguments + temporaries + outputs not aliased to inputs (two scalars).

Each row is appended to `--rows` (JSON lines) as soon as it is compiled, so a long run can be stopped and
resumed, and `--from-rows` rebuilds the table without compiling.

Caveats, written into the table: the analysis comes from the backend this script runs on. On a CPU-only
machine the step is compiled for XLA:CPU with the XLA attention kernel, which holds [batch, heads, L, L]
attention probabilities; cuDNN flash attention on the GPU never does, so the CPU figures are an upper bound
by about that much (the "with cuDNN" column subtracts those buffers: one block's probabilities in bf16 plus
its float32 logits, or every block's probabilities for `none`). XLA:CPU computes bfloat16 matmuls in
float32 (converting whole stacked weights), so its temporaries for the bf16 step are not the GPU's; with
`--f32-estimate` the temporaries are also estimated from a float32 compile of the same step, halved, plus
the float32 LoRA gradients. Run it on the GPU itself for exact figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name, memory (bytes), platform
DEVICES = {"h20": ("NVIDIA H20", 96e9, "gpu"), "h100": ("NVIDIA H100 SXM", 80e9, "gpu"),
           "h200": ("NVIDIA H200", 141e9, "gpu"), "v5p": ("TPU v5p", 95e9, "tpu")}
SIZES = {"512x512": "watermark", "512x1024": "xray"}
JAX_GPU_DEFAULT_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION when unset: JAX's GPU pool is 75% of memory
TPU_HEADROOM = 0.9  # TPU: no preallocated pool; plan to use at most 90% of HBM (runtime, fragmentation)
# remat policies from least to most recomputation (flux-dev 512x512 train step, XLA's FLOP count of an
# earlier run: none 130, dots_no_batch 139, proj 140, attn 170, full 170 TFLOP)
RECOMPUTE_ORDER = ("none", "dots", "dots_no_batch", "proj", "offload", "attn", "full")


def configured_fraction(device: str) -> float | None:
    """The GPU memory-pool fraction the device's config sets (configs/gpu_<device>.py), None without one."""
    from dd_jax import config as config_lib

    path = os.path.join(REPO, "configs", f"gpu_{device}.py")
    if not os.path.isfile(path):
        return None
    return float(config_lib.load_config_file(path).train.gpu_memory_fraction) or None


def pool_bytes(device: str, fraction: float | None = None) -> float:
    """What the step may use on `device`: JAX's GPU pool (fraction x memory; default 0.75), or 90% of TPU HBM."""
    _, cap, platform = DEVICES[device]
    if platform == "tpu":
        return TPU_HEADROOM * cap
    return (fraction or JAX_GPU_DEFAULT_FRACTION) * cap


def _compile(size: str, policy: str, txt_len: int, dtype: str | None = None, scan: bool = True):
    import jax

    from dd_jax import aot, config as config_lib

    config = config_lib.load_config_file(os.path.join(REPO, "configs", f"gpu_h20.py:{SIZES[size]}"))
    if jax.default_backend() != "gpu":
        config.model.attention = "xla"  # cuDNN cannot compile here; see the caveat
    config.model.remat = policy
    config.model.scan_layers = scan
    if dtype:
        config.model.param_dtype = config.model.compute_dtype = dtype
    return config, aot.compile_train_step(config, txt_len=txt_len)


def plan_one(size: str, policy: str, txt_len: int = 512, f32_estimate: bool = False, row: dict | None = None) -> dict:
    """XLA's memory analysis of the production bf16 step (and, with `f32_estimate`, the temporaries
    estimated from a float32 compile, halved, plus the float32 LoRA gradients). `row`: an earlier result
    of the bf16 compile, completed with the float32 estimate."""

    t0 = time.time()
    if row is not None:
        out = dict(row)
        out["temp_bytes"] = out["temp_bytes_xla"]
        r = argparse.Namespace(trainable_params=out["trainable_params"])
    else:
        out = _bf16_row(size, policy, txt_len)
        r = argparse.Namespace(trainable_params=out["trainable_params"])
    if f32_estimate and out["backend"] != "gpu":
        _, r32 = _compile(size, policy, txt_len, dtype="float32")
        out["temp_bytes_f32_compile"] = int(r32.memory.temp_size_in_bytes)
        out["temp_bytes"] = out["temp_bytes_f32_compile"] // 2 + 4 * r.trainable_params
    out["compile_s"] = round(out.get("compile_s", 0) + time.time() - t0, 1)
    out["peak_bytes"] = out["argument_bytes"] + out["temp_bytes"] + max(0, out["output_bytes"] - out["alias_bytes"])
    return out


def _bf16_row(size: str, policy: str, txt_len: int) -> dict:
    import jax

    config, r = _compile(size, policy, txt_len)
    m = r.memory
    out = {"size": size, "remat": policy, "tokens": r.tokens, "backend": jax.default_backend(),
           "jax": jax.__version__, "attention": config.model.attention,
           "argument_bytes": int(m.argument_size_in_bytes), "temp_bytes_xla": int(m.temp_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "partition_bytes": r.partition_bytes, "trainable_params": r.trainable_params,
           "total_params": r.total_params}
    out["temp_bytes"] = out["temp_bytes_xla"]
    return out


def cudnn_saving(r: dict, depth: int = 19 + 38, heads: int = 24) -> int:
    """Attention buffers the XLA kernel holds and flash attention does not: every block's bf16
    probabilities when nothing is rematerialised, else one block's probabilities + float32 logits."""
    if r["backend"] == "gpu":
        return 0
    per_block = heads * r["tokens"] ** 2
    return depth * per_block * 2 if r["remat"] == "none" else per_block * (2 + 4)


def choose(rows: list[dict], budget: float, cudnn: bool = False) -> dict[str, str]:
    """Per size: the least-recomputation policy (RECOMPUTE_ORDER) whose peak fits in `budget` bytes
    (`cudnn`: the peak with the flash-attention estimate)."""
    best = {}
    for size in sorted({r["size"] for r in rows}):
        fits = [r for r in rows if r["size"] == size
                and r["peak_bytes"] - (cudnn_saving(r) if cudnn else 0) <= budget]
        best[size] = min(fits, key=lambda r: RECOMPUTE_ORDER.index(r["remat"]))["remat"] if fits else "does not fit"
    return best


def markdown(rows: list[dict], devices: list[str]) -> str:
    gb = lambda b: f"{b / 1e9:.1f}"
    r0 = rows[0]
    pb = r0["partition_bytes"]
    lines = [
        "# Memory plan: flux-dev LoRA ICD training on one accelerator",
        "",
        "Generated by `python scripts/memory_plan.py` from XLA's memory analysis of the compiled production training "
        "step (`dd_jax.train.make_step`, the step `python -m dd_jax.train` runs, lowered by `dd_jax.aot` on abstract "
        f"shapes; backend: {r0['backend']}, jax {r0.get('jax', '?')}, attention kernel compiled: {r0['attention']}). "
        f"Model: flux-dev ({r0['total_params'] / 1e9:.2f}B parameters incl. the VAE, bf16), LoRA r128 on every "
        f"attention and MLP projection ({r0['trainable_params'] / 1e6:.0f}M float32 parameters, AdamW), ICD with 3 "
        "image layers + 512 cached text tokens (T5/CLIP not on the device), the VAE encoding the 3 images inside the "
        "step, batch 1, scanned blocks.",
        "",
        f"The step donates what it changes and reads the rest: LoRA parameters {gb(pb['trainable'])} GB + AdamW state "
        f"{gb(pb['optimizer'])} GB are donated and come back in place (aliased {gb(r0['alias_bytes'])} GB); the frozen "
        f"base {gb(pb['frozen'])} GB is a read-only input that is never returned "
        f"(outputs {gb(r0['output_bytes'])} GB).",
        "",
        "| image size | tokens | remat | arguments GB | outputs GB | aliased GB | temporaries GB | peak GB "
        "| peak with cuDNN attention GB (est.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {r['tokens']} | {r['remat']} | {gb(r['argument_bytes'])} | "
                     f"{gb(r['output_bytes'])} | {gb(r['alias_bytes'])} | {gb(r['temp_bytes'])} | "
                     f"{gb(r['peak_bytes'])} | {gb(r['peak_bytes'] - cudnn_saving(r))} |")
    if any("temp_bytes_f32_compile" in r for r in rows):
        lines += ["", "Temporaries: estimated from a float32 compile of the same step, halved, plus the float32 "
                  "LoRA gradients (XLA:CPU's bf16 compile reports " + ", ".join(
                      f"{r['size']} {r['remat']}: {gb(r['temp_bytes_xla'])} GB" for r in rows) + ")."]
    lines += ["", "Peak = arguments + temporaries + outputs not aliased to inputs. What each device lets the step use: "
              f"on a GPU, JAX's memory pool, `XLA_PYTHON_CLIENT_MEM_FRACTION` x memory (JAX's default "
              f"{JAX_GPU_DEFAULT_FRACTION}, preallocated at start); on a TPU, HBM less "
              f"{100 - int(TPU_HEADROOM * 100)}% headroom. The chosen policy is the least recomputation "
              "(none < dots_no_batch < proj < attn < full) whose peak fits (its peak in GB in brackets). "
              "Policies compiled: "
              + ", ".join(sorted({f"`{r['remat']}`" for r in rows})) + ".", "",
              "| device | memory GB | pool fraction | usable GB | " + " | ".join(
                  f"{s} (XLA:{r0['backend'].upper()} peak)" for s in sorted({r['size'] for r in rows}))
              + " | " + " | ".join(f"{s} (cuDNN est.)" for s in sorted({r['size'] for r in rows})) + " |",
              "|---|---|---|---|" + "---|" * (2 * len({r['size'] for r in rows}))]
    for d in devices:
        name, cap, platform = DEVICES[d]
        fractions = [None] if platform == "tpu" else [None] + ([configured_fraction(d)] if configured_fraction(d)
                                                               else [])
        for frac in fractions:
            budget = pool_bytes(d, frac)
            shown = "n/a (TPU)" if platform == "tpu" else (f"{frac} (configs/gpu_{d}.py)" if frac
                                                          else f"{JAX_GPU_DEFAULT_FRACTION} (JAX default)")
            plain, est = choose(rows, budget), choose(rows, budget, cudnn=platform == "gpu")

            def cell(size, policy, cudnn):  # the chosen policy and its peak
                r = [x for x in rows if x["size"] == size and x["remat"] == policy]
                return f"`{policy}`" + (f" ({gb(r[0]['peak_bytes'] - (cudnn_saving(r[0]) if cudnn else 0))})"
                                        if r else "")

            cells = [cell(s, plain[s], False) for s in sorted(plain)] + [
                cell(s, est[s], True) if platform == "gpu" else "n/a" for s in sorted(est)]
            lines.append(f"| {name} | {cap / 1e9:.0f} | {shown} | {gb(budget)} | " + " | ".join(cells) + " |")
    if r0["backend"] != "gpu":
        lines += ["", f"Caveat: compiled for XLA:{r0['backend'].upper()}, not the GPU or TPU, and these are the "
                  "figures XLA:CPU reports. Arguments, outputs and aliasing are exact (they follow from the step's "
                  "signature). The temporaries are not the accelerator's: the CPU step uses the XLA attention kernel, "
                  "which materialises [heads, L, L] attention probabilities; cuDNN flash attention (the GPU configs) "
                  "does not, so the \"with cuDNN\" column subtracts one block's [heads, L, L] probabilities (bf16) and "
                  "logits (float32) for remat policies that recompute attention, and every block's probabilities for "
                  "`none`. XLA:CPU also computes bfloat16 matmuls in float32, converting whole stacked weights, which "
                  "inflates its temporaries for the bf16 step (see the note above where a float32 compile was used to "
                  "estimate them). TPU splash attention likewise holds no [L, L] buffer. Re-run the script on the "
                  "device for exact figures (`python scripts/memory_plan.py` on a GPU compiles with cuDNN)."]
    lines += ["", "`configs/gpu_h20.py` and `configs/gpu_h100.py` use the chosen policies and set the GPU pool "
              "fraction (`train.gpu_memory_fraction`, exported as `XLA_PYTHON_CLIENT_MEM_FRACTION` by `dd_jax.train` "
              "before JAX starts, unless the environment sets it). `configs/tpu_pod.py` uses `proj` as well: with FSDP "
              "over a slice the base and optimizer state divide by the chip count, while activations per chip stay "
              "those of one example."]
    lines += ["", "Remat policies (`dd_jax.models.flux.REMAT_POLICIES`): `none` keeps every intermediate; `dots` keeps "
              "every matmul output; `dots_no_batch` keeps every matmul output but attention's (with LoRA: the base "
              "and the adapter products separately); `proj` keeps each projection's summed output; `attn` "
              "keeps q/k/v and the attention output and recomputes the MLPs; `offload` moves q/k/v, attention "
              "output and MLP hidden to pinned host memory; `full` keeps only each block's input."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="h20,h100,h200,v5p")
    ap.add_argument("--sizes", default="512x512,512x1024")
    ap.add_argument("--policies", default="proj,full")
    ap.add_argument("--f32-estimate", action="store_true", help="also compile in float32 to estimate temporaries")
    ap.add_argument("--rows", default=None, help="append each compiled row here (JSON lines); rows already in it "
                    "are not compiled again")
    ap.add_argument("--from-rows", default=None, help="rebuild the table from a --rows file (no compiling)")
    ap.add_argument("--markdown", default=None, help="write the table here (e.g. docs/memory_plan.md)")
    args = ap.parse_args(argv)
    rows = []
    src = args.from_rows or args.rows
    if src and os.path.exists(src):
        with open(src) as f:
            rows = list({(r["size"], r["remat"]): r for r in map(json.loads, filter(str.strip, f))}.values())
    if not args.from_rows:
        for size in args.sizes.split(","):
            for policy in args.policies.split(","):
                old = [r for r in rows if r["size"] == size and r["remat"] == policy]
                if old and (not args.f32_estimate or "temp_bytes_f32_compile" in old[-1]):
                    continue
                r = plan_one(size, policy, f32_estimate=args.f32_estimate, row=old[-1] if old else None)
                rows = [x for x in rows if not (x["size"] == size and x["remat"] == policy)] + [r]
                if args.rows:
                    with open(args.rows, "a") as f:  # the last row of a (size, remat) is the one read back
                        f.write(json.dumps(r) + "\n")
                print(f"{size} remat={policy}: peak {r['peak_bytes'] / 1e9:.1f} GB (arguments "
                      f"{r['argument_bytes'] / 1e9:.1f}, temporaries {r['temp_bytes'] / 1e9:.1f}, outputs "
                      f"{r['output_bytes'] / 1e9:.2f}, aliased {r['alias_bytes'] / 1e9:.2f}), compiled in "
                      f"{r['compile_s']}s", flush=True)
    rows.sort(key=lambda r: (r["size"], RECOMPUTE_ORDER.index(r["remat"])))
    devices = args.devices.split(",")
    for d in devices:
        print(f"{DEVICES[d][0]}: {choose(rows, pool_bytes(d, configured_fraction(d)))}")
    if args.markdown:
        text = markdown(rows, devices)
        if os.path.exists(args.markdown):  # keep scripts/memory_plan_quantized.py's section
            with open(args.markdown) as f:
                old = f.read()
            begin, end = "<!-- QUANTIZED_BEGIN -->", "<!-- QUANTIZED_END -->"
            if begin in old and end in old:
                text += "\n" + old[old.index(begin):old.index(end) + len(end)] + "\n"
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
