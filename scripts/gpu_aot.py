#!/usr/bin/env python
"""XLA:GPU's own compilation of the production programs for an H100, on a machine without a GPU.

    JAX_PLATFORMS=cpu python scripts/gpu_aot.py --out gpu_aot.json [--only train,sample,quantized] [--dry]

Needs jax's CUDA plugin (`pip install "jax[cuda13]==<jax's version>"`), not a GPU: `dd_jax.aot.gpu_mesh`
describes one H100 80GB to XLA (dd_jax/assets/gpu_targets/h100_80gb.txtpb) and every program is compiled for
it ahead of time. There is no autotuning without the device, so XLA:GPU picks its default kernels. Timing needs the
GPU (scripts/device_check.py). What this gives without one, per program:
- XLA:GPU's memory analysis: arguments, temporaries, outputs, aliased bytes, and the planned peak
  (arguments + temporaries + outputs not aliased to arguments). This is what decides "fits" or "out of memory"
  for a row;
- the optimized program's kernels (`dd_jax.hlo_stats`): fusions, matmuls (float8 ones counted apart), Triton GEMM
  fusions and cuBLAS calls, cuDNN attention calls forward and backward, copies and transposes.

Rows (flux-dev, bf16, LoRA r128, 512x512 ICD = 3072 image + 512 text tokens, cuDNN attention, scanned blocks):
- train: the LoRA step at batch 1, 2, 4 under remat proj, proj_attn and none (the device check's sweep);
- sample: one sampler step, LoRA beside the base / folded / folded with RoPE after the norm / folded fp8_w8a8;
- quantized: the QLoRA step (int8 and fp8_w8a8) at 512x512, and int8 decomposition at 512 and 1024
  (docs/memory_plan.md's rows, for the GPU).
`--dry` compiles the smallest shapes (hidden 256, 1+1 blocks), to test the script. Each row is written to
`--out` as soon as it is compiled, so a killed run keeps its finished rows. A rerun skips rows that are
already in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

GiB = 2**30


def _config(dry: bool, size: int, remat: str, batch: int = 1, quantize: str = ""):
    import device_check

    c = device_check.config_for(dry, size, size, remat)
    c.model.platform = "cuda"
    c.model.attention = "cudnn"
    c.data.batch_size = batch
    c.model.quantize = quantize
    return c


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                            "temp_size_in_bytes")}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["temp_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"])
    out["peak_gib"] = round(out["peak_bytes"] / GiB, 2)
    return out


def _kernels(compiled) -> dict:
    from dd_jax import hlo_stats

    text = compiled.as_text()
    top, _ = hlo_stats.op_counts(text)
    calls = [line for line in text.splitlines() if "custom_call_target=" in line and " = " in line]
    target = lambda line: line.split('custom_call_target="', 1)[1].split('"', 1)[0]
    dots, f8_dots = hlo_stats.dot_counts(text)
    return {"fusions": top.get("fusion", 0), "custom_calls": len(calls), "matmuls": dots, "fp8_matmuls": f8_dots,
            "cublas_calls": sum("cublas" in target(line) for line in calls),
            "triton_gemm_fusions": len(re.findall(r'"kind":"__triton_(nested_)?gemm_fusion"', text)),
            "cudnn_attention_forward": sum(target(line) == "__cudnn$fmhaSoftmax" for line in calls),
            "cudnn_attention_backward": sum(target(line) == "__cudnn$fmhaSoftmaxBackward" for line in calls),
            "copies": top.get("copy", 0), "transposes": top.get("transpose", 0),
            "top_level_ops": sum(v for k, v in top.items() if k not in ("parameter", "constant", "tuple",
                                                                       "get-tuple-element", "bitcast"))}


def train_row(mesh, dry, size, remat, batch, quantize=""):
    from dd_jax import aot

    step = aot.compile_train_step(_config(dry, size, remat, batch, quantize), txt_len=8 if dry else 512,
                                  mesh=mesh)
    return {"memory": _memory(step.compiled), "kernels": _kernels(step.compiled), "tokens": step.tokens}


def sample_row(mesh, dry, variant):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import aot, lora, quantize, sampling, system as system_lib
    from dd_jax.models import flux

    config = _config(dry, 64 if dry else 512, "none")
    txt_len = 8 if dry else 512

    def build():
        model = system_lib.build_model(config, load_weights=False)
        tr = model.transformer
        if variant != "lora":
            lora.merge_lora(tr)
        if variant == "merged_rope_after_norm":
            flux.set_rope_in_norm(tr, False)
        if variant == "merged_fp8_w8a8":
            quantize.quantize_module(tr, "fp8_w8a8", quantize.FLUX_TARGETS)
        return model

    model = aot.on_mesh(nnx.eval_shape(build), mesh)
    system = system_lib.wrap(model, config)
    p = model.transformer.params
    h, w = system.grid(config.data.height, config.data.width)
    cond, txt, vec, key = aot.on_mesh((jax.ShapeDtypeStruct((1, h * w, p.in_channels), jnp.float32),
                                       jax.ShapeDtypeStruct((1, txt_len, p.context_in_dim), jnp.bfloat16),
                                       jax.ShapeDtypeStruct((1, p.vec_in_dim), jnp.bfloat16),
                                       jax.ShapeDtypeStruct((), jax.random.key(0).dtype)), mesh)
    compiled = sampling.lower_sample(model.transformer, system.spec, cond, txt, vec, key, (h, w), 1, system.guidance,
                                     **system.output_reading()).compile()
    return {"memory": _memory(compiled), "kernels": _kernels(compiled)}


def decompose_row(mesh, dry, size, qtype):
    from dd_jax import aot

    c = _config(dry, size, "none", quantize=qtype)
    d = aot.compile_decompose(c, txt_len=8 if dry else 512, mesh=mesh)
    return {"memory": _memory(d.compiled), "kernels": _kernels(d.compiled), "weights_bytes": d.weights_bytes}


def plan(dry: bool) -> list[tuple[str, str, dict]]:
    """(group, row name, arguments) in the order they compile: the most telling first (a run may be cut short)."""
    size = 64 if dry else 512
    train = lambda batch, remat: ("train", f"512x512_b{batch}_{remat}", dict(size=size, remat=remat, batch=batch))
    qlora = lambda q: ("quantized", f"qlora_{q}_512x512_b1_proj", dict(size=size, remat="proj", batch=1, quantize=q))
    rows = [train(1, remat) for remat in ("proj", "proj_attn", "none")]
    rows.append(qlora("int8"))
    rows += [("quantized", f"decompose_int8_{s}x{s}", dict(size=s, qtype="int8"))
             for s in ((64,) if dry else (512, 1024))]
    rows += [("sample", v, dict(variant=v)) for v in ("lora", "merged", "merged_rope_after_norm", "merged_fp8_w8a8")]
    if not dry:
        rows += [train(batch, remat) for batch in (2, 4) for remat in ("proj", "proj_attn", "none")]
    rows.append(qlora("fp8_w8a8"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file of the rows (kept and added to: a rerun resumes)")
    ap.add_argument("--only", default="train,sample,quantized", help="groups, comma-separated")
    ap.add_argument("--target", default="h100_80gb", help="a file of dd_jax/assets/gpu_targets")
    ap.add_argument("--dry", action="store_true", help="the smallest shapes, to test the script")
    args = ap.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - {"train", "sample", "quantized"}
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}; choose from train, sample, quantized")
    import jax

    from dd_jax import aot

    mesh = aot.gpu_mesh(args.target)
    result = {"target": args.target, "jax": jax.__version__, "dry": args.dry, "rows": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    fns = {"train": train_row, "sample": sample_row, "quantized": None}
    for group, name, kw in plan(args.dry):
        if group not in groups or name in result["rows"]:
            continue
        fn = fns[group] or (decompose_row if name.startswith("decompose") else train_row)
        t0 = time.perf_counter()
        try:
            row = fn(mesh, args.dry, **kw)
        except Exception as e:  # a row that does not compile is recorded, the others still run
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        row.update(group=group, compile_s=round(time.perf_counter() - t0, 1))
        result["rows"][name] = row
        mem = row.get("memory", {})
        print(f"{name:34s} {row['compile_s']:6.1f} s  peak {mem.get('peak_gib', '-')} GiB  "
              f"{row.get('kernels', row.get('error'))}", flush=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
