#!/usr/bin/env python
"""Memory of a quantized flux-dev on a 24 GB GPU, from XLA's memory analysis of ahead-of-time compiles (nothing
allocated): decomposition (transformer + VAE resident, T5 not) and the QLoRA training step.

    python scripts/memory_plan_quantized.py --rows docs/memory_plan_quantized_rows.jsonl \\
        [--only decompose:int8:512,decompose:int8:1024,train:int8:512] [--markdown docs/memory_plan.md]

Rows `kind:qtype:size` (qtype "bf16" = not quantized):
- `decompose`: `dd_jax.aot.compile_decompose` of configs/flux.py:dev at size x size, batch 1, 512 T5 tokens, the
  VAE encoding the composite and decoding both layers, 2 Euler steps in the sampler's loop (the loop body is the
  same for 28); scanned blocks (one compiled block; the weights are the same arrays).
- `train`: `dd_jax.aot.compile_train_step` of configs/gpu_h20.py:watermark (flux-dev + LoRA r128, remat `proj`,
  scanned blocks, AdamW, the VAE encoding the 3 images inside the step) with model.quantize.

Each row is appended to `--rows` as soon as it is compiled (rows already there are not compiled again), and
`--markdown` rewrites the section between QUANTIZED_BEGIN and QUANTIZED_END of that file (appended if absent;
scripts/memory_plan.py keeps the section when it rewrites the file).

Caveat, as for scripts/memory_plan.py: on a CPU-only machine the program is compiled for XLA:CPU with the XLA
attention kernel, which holds one block's [heads, L, L] float32 logits and 16-bit probabilities; cuDNN flash
attention (a GPU's `model.attention="auto"`) holds neither, so the table also gives the peak less those buffers
("cuDNN est."). Arguments, outputs and aliasing follow from the program's signature and are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BEGIN, END = "<!-- QUANTIZED_BEGIN -->", "<!-- QUANTIZED_END -->"
DEFAULT_ROWS = "decompose:int8:512,decompose:int8:1024,train:int8:512,decompose:bf16:512"
GIB = 2**30
BUDGET = {"decompose": 20 * GIB, "train": 40 * GIB}
HEADS = 24


def _config(kind: str, qtype: str, size: int, dtype: str | None = None):
    import jax

    from dd_jax import config as config_lib

    if kind == "decompose":
        config = config_lib.load_config_file(os.path.join(REPO, "configs", "flux.py:dev"))
        config.data.height = config.data.width = size
        config.model.scan_layers = True
    else:
        config = config_lib.load_config_file(os.path.join(REPO, "configs", "gpu_h20.py:watermark"))
        config.data.height = config.data.width = size
    if jax.default_backend() != "gpu":
        config.model.attention = "xla"  # cuDNN cannot compile here; see the caveat
    config.model.quantize = "" if qtype == "bf16" else qtype
    if dtype:
        config.model.param_dtype = config.model.compute_dtype = dtype
    return config


def compile_row(kind: str, qtype: str, size: int, txt_len: int = 512, f32_estimate: bool = False) -> dict:
    import jax

    from dd_jax import aot

    config = _config(kind, qtype, size)
    t0 = time.time()
    if kind == "decompose":
        r = aot.compile_decompose(config, txt_len=txt_len)
        extra = {"weights_bytes": r.weights_bytes, "bf16_transformer_bytes": _bf16_transformer_bytes(config)}
    else:
        r = aot.compile_train_step(config, txt_len=txt_len)
        extra = {"partition_bytes": r.partition_bytes, "trainable_params": r.trainable_params}
    m = r.memory
    row = {"kind": kind, "qtype": qtype, "size": size, "tokens": r.tokens, "backend": jax.default_backend(),
           "jax": jax.__version__, "attention": config.model.attention, "remat": config.model.remat,
           "argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "compile_s": round(time.time() - t0, 1), **extra}
    if f32_estimate and row["backend"] != "gpu" and kind == "train":
        # XLA:CPU computes bf16 matmuls in float32 (whole converted operands): as scripts/memory_plan.py does,
        # estimate the bf16 temporaries from a float32 compile of the same step, halved, plus the float32 LoRA
        # gradients (the int8 kernels stay int8; they dequantize to float32 there, to bf16 on the GPU)
        r32 = aot.compile_train_step(_config(kind, qtype, size, "float32"), txt_len=txt_len)
        row["temp_bytes_xla"] = row["temp_bytes"]
        row["temp_bytes_f32_compile"] = int(r32.memory.temp_size_in_bytes)
        row["temp_bytes"] = row["temp_bytes_f32_compile"] // 2 + 4 * row["trainable_params"]
        row["compile_s"] = round(time.time() - t0, 1)
    row["peak_bytes"] = row["argument_bytes"] + row["temp_bytes"] + max(0, row["output_bytes"] - row["alias_bytes"])
    return row


def _bf16_transformer_bytes(config) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import system as system_lib
    from dd_jax.models import flux

    model = nnx.eval_shape(lambda: flux.Flux(system_lib.flux_params(config.model), rngs=nnx.Rngs(0),
                                             param_dtype=jnp.bfloat16))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model))))


def attention_bytes(row: dict) -> int:
    """One block's attention buffers the XLA kernel holds and flash attention does not (float32 logits + 16-bit
    probabilities, [heads, L, L]); 0 when compiled on the GPU itself."""
    return 0 if row["backend"] == "gpu" else HEADS * row["tokens"] ** 2 * (4 + 2)


def estimate(row: dict) -> int:
    """The peak used against the budget: XLA's figure for decomposition; for the train step on a CPU, the peak
    from the float32-compile estimate of the temporaries, less one block's attention buffers."""
    if row["kind"] == "train":
        return row["peak_bytes"] - attention_bytes(row)
    return row["peak_bytes"]


def markdown(rows: list[dict], others: list[dict] = ()) -> str:
    """The section's text for `rows`; `others` (rows compiled but not tabled) are mentioned where they explain."""
    gib = lambda b: f"{b / GIB:.1f}"
    r0 = rows[0]
    lines = [BEGIN, "", "## Quantized flux-dev on a 24 GB GPU (`model.quantize`, `--quantize`)", "",
             "Generated by `python scripts/memory_plan_quantized.py` from XLA's memory analysis of ahead-of-time "
             f"compiles on abstract shapes (backend {r0['backend']}, jax {r0['jax']}, attention kernel compiled: "
             f"{r0['attention']}; nothing allocated). The transformer's blocks are stored weight-only quantized "
             "(`dd_jax.quantize`, qwix: int8 kernels with a float32 scale per output column; int4 in groups of 64 "
             "rows), the embedders, final layer, norms and the VAE in bf16, LoRA in float32. Decomposition: "
             "`dd_jax.aot.compile_decompose` of configs/flux.py:dev (VAE encode + Euler sampler + VAE decode of both "
             "layers, batch 1, 512 T5 tokens as an input: T5 is not resident, `dd_jax.prompts` encodes the "
             "prompts and drops T5 before the transformer loads). Training: `dd_jax.aot.compile_train_step` of "
             "configs/gpu_h20.py:watermark with `model.quantize=int8` (LoRA r128 on every attention/MLP projection, "
             "AdamW, remat `proj`, the VAE encoding the 3 images in the step).",
             "",
             "| program | weights | image | tokens | arguments GiB | temporaries GiB | outputs GiB | aliased GiB "
             "| peak GiB | planned peak GiB | budget GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = "decomposition" if r["kind"] == "decompose" else "QLoRA train step"
        temps = gib(r["temp_bytes"]) + (f" (XLA:CPU {gib(r['temp_bytes_xla'])})" if "temp_bytes_xla" in r else "")
        ok = "fits" if estimate(r) <= BUDGET[r["kind"]] else "over"
        lines.append(f"| {what} | {r['qtype']} | {r['size']}x{r['size']} | {r['tokens']} | {gib(r['argument_bytes'])} "
                     f"| {temps} | {gib(r['output_bytes'])} | {gib(r['alias_bytes'])} | {gib(r['peak_bytes'])} "
                     f"| {gib(estimate(r))} | {BUDGET[r['kind']] // GIB} ({ok}) |")
    weights = {r["qtype"]: r for r in rows if r["kind"] == "decompose" and "weights_bytes" in r}  # one per qtype
    for q, r in weights.items():
        w = r["weights_bytes"]
        lora = f", of which float32 LoRA r128 adapters {gib(w['lora'])} GiB" if "lora" in w else ""
        lines += ["", f"Resident weights of the {q} decomposition: transformer {gib(w['transformer'])} GiB{lora}, "
                  f"VAE {gib(w['vae'])} GiB."]
    train = [r for r in rows if r["kind"] == "train" and "partition_bytes" in r]
    for r in train:
        p = r["partition_bytes"]
        lines += ["", f"QLoRA step ({r['qtype']}): frozen base {gib(p['frozen'])} GiB (transformer + VAE; 22.4 GiB in "
                  f"bf16, the table above), LoRA {gib(p['trainable'])} GiB + AdamW state {gib(p['optimizer'])} GiB, "
                  "donated and aliased."]
    lines += ["", "Peak = arguments + temporaries + outputs not aliased to inputs. Planned peak: decomposition, "
              "XLA's peak as it is (on XLA:CPU the attention kernel compiled is the XLA one; cuDNN flash attention "
              "holds less); QLoRA step, as scripts/memory_plan.py plans the bf16 step: XLA:CPU computes bf16 "
              "matmuls in float32, which inflates its bf16 temporaries (the XLA:CPU figure in brackets), so the "
              "temporaries are estimated from a float32 compile of the same step (int8 kernels still int8), halved, "
              "plus the float32 LoRA gradients, and one block's [24 heads, L, L] attention logits (float32) and "
              "probabilities (16-bit) are subtracted, which flash attention (`model.attention=\"auto\"` on an "
              "NVIDIA GPU) does not hold. Rerun the script on the GPU for exact figures; "
              "`dd_jax.aot.time_quantized_steps` reports the device's own peak."]
    if any(r["qtype"] == "bf16" for r in rows):
        lines += ["", "The bf16 row is for contrast: its arguments alone (the bf16 weights) pass 20 GiB. Its "
                  "temporaries are XLA:CPU's conversion of every bf16 weight to float32 for its matmuls, which a GPU "
                  "does not do; the int8 kernels are dequantized one matmul at a time, so their rows carry no such "
                  "copy."]
    for r in [r for r in others if r["qtype"] == "int4" and r["kind"] == "decompose"]:
        lines[-1] += (f" (An int4 decomposition at {r['size']}x{r['size']} compiled here has "
                      f"{gib(r['argument_bytes'])} GiB of arguments, but XLA:CPU unpacks the int4 kernels whole: "
                      f"{gib(r['temp_bytes'])} GiB of temporaries; the rows file keeps it.)")
    lines += ["",
              "On a 24 GB GPU: decompose with `--quantize int8 --batch-size 1` (decompose's default batches 16 "
              "tiles) and a JAX pool of `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` (21.6 GB = 20.1 GiB; JAX's default "
              "0.75 leaves 16.8 GiB, enough at 512x512). T5-XXL (4.8B parameters, 9 GiB in bf16, 4.5 GiB in "
              "int8) is loaded only before the transformer, or not at all when the text cache holds the prompts. "
              "The QLoRA step is for a 40-48 GB GPU (A6000, L40S, A100 40 GB); on 24 GB it does not fit.", "", END]
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new if new.endswith("\n") else new + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=DEFAULT_ROWS, help="rows kind:qtype:size, comma-separated")
    ap.add_argument("--rows", default=None, help="JSON lines: rows read from and appended to")
    ap.add_argument("--from-rows", action="store_true", help="only rebuild the table from --rows")
    ap.add_argument("--f32-estimate", action="store_true", help="train rows on a CPU: also compile in float32 to "
                    "estimate the bf16 temporaries (see compile_row)")
    ap.add_argument("--markdown", default=None, help="write the section into this file (docs/memory_plan.md)")
    args = ap.parse_args(argv)
    rows = []
    if args.rows and os.path.exists(args.rows):
        with open(args.rows) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    key = lambda r: (r["kind"], r["qtype"], int(r["size"]))
    rows = list({key(r): r for r in rows}.values())  # the last row of a (kind, qtype, size) is the one read back
    wanted = [(k, q, int(s)) for k, q, s in (x.split(":") for x in args.only.split(","))]
    if not args.from_rows:
        for k, q, s in wanted:
            if any(key(r) == (k, q, s) and (not args.f32_estimate or k != "train" or "temp_bytes_xla" in r)
                   for r in rows):
                continue
            r = compile_row(k, q, s, f32_estimate=args.f32_estimate)
            rows = [x for x in rows if key(x) != (k, q, s)]
            rows.append(r)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(r) + "\n")
            print(f"{k} {q} {s}x{s}: peak {r['peak_bytes'] / GIB:.1f} GiB (arguments {r['argument_bytes'] / GIB:.1f}, "
                  f"temporaries {r['temp_bytes'] / GIB:.1f}, outputs {r['output_bytes'] / GIB:.2f}, aliased "
                  f"{r['alias_bytes'] / GIB:.2f}; planned {estimate(r) / GIB:.1f}), "
                  f"compiled in {r['compile_s']}s", flush=True)
    others = [r for r in rows if key(r) not in wanted]
    rows = [r for r in rows if key(r) in wanted] or rows
    rows.sort(key=lambda r: (r["kind"] != "decompose", r["qtype"] == "bf16", r["qtype"], r["size"]))
    if args.markdown and rows:
        write_section(args.markdown, markdown(rows, others))
    return 0


if __name__ == "__main__":
    sys.exit(main())
