#!/usr/bin/env python
"""Peak memory of converting the autoencoder and the T5 encoder: does it follow the largest tensor?

Writes synthetic checkpoints in the hub's layout (config.json + safetensors,
random data) at the real widths, FLUX.1's autoencoder (channels 128..512)
and T5-XXL (d_model 4096, d_ff 10240, 32128 tokens), with two depths each
(more resnet blocks per level, more T5 blocks), converts each with
`scripts/convert_flux.py --components vae|t5` in a fresh subprocess, and
prints file sizes and the converter's peak RSS:

    python scripts/benchmark_convert_encoders.py [--component vae,t5] [--dtype bfloat16] [--workdir DIR]

The files are written tensor by tensor (`benchmark_convert.write_safetensors`),
so this script never holds a whole checkpoint either. "baseline" is the peak
RSS of a process that only imports the converter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_convert import _ST_DTYPE, REPO, peak_rss_of, write_safetensors  # noqa: E402

FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True, _class_name="AutoencoderKL")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, model_type="t5", architectures=["T5EncoderModel"])
DEPTHS = {"vae": (2, 6), "t5": (2, 4)}  # resnet blocks per level / T5 blocks


def source_shapes(component: str, depth: int) -> tuple[dict, dict, str]:
    """(config.json content, tensor name -> shape, safetensors file name) for a synthetic checkpoint."""
    from weights_conversion import autoencoder as ae_maps, t5 as t5_maps

    if component == "vae":
        config = {**FLUX_VAE, "layers_per_block": depth}
        plan = ae_maps.build_plan(ae_maps.params_from_diffusers_config(config), "diffusers")
        filename = "diffusion_pytorch_model.safetensors"
    else:
        config = {**T5_XXL, "num_layers": depth}
        plan = t5_maps.build_plan(t5_maps.config_from_transformers(config))
        filename = "model.safetensors"
    shapes = {s: shape for rule in plan.values() for s, shape in zip(rule.sources, rule.shapes)}
    return config, shapes, filename


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--component", default="vae,t5", help="vae, t5 or both (comma-separated)")
    ap.add_argument("--dtype", choices=sorted(_ST_DTYPE), default="bfloat16")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp folder)")
    args = ap.parse_args(argv)
    components = [c.strip() for c in args.component.split(",") if c.strip()]
    if not components or any(c not in DEPTHS for c in components):
        ap.error(f"--component takes {', '.join(DEPTHS)}")
    work = args.workdir or tempfile.mkdtemp(prefix="dd_jax_bench_encoders_")
    os.makedirs(work, exist_ok=True)
    itemsize = np.dtype(_ST_DTYPE[args.dtype][1]).itemsize
    code, baseline = peak_rss_of([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                  "import weights_conversion.convert, weights_conversion.pipeline, orbax.checkpoint",
                                  REPO])
    rows = []
    try:
        for component in components:
            for depth in DEPTHS[component]:
                config, shapes, filename = source_shapes(component, depth)
                src = os.path.join(work, f"{component}_{depth}")
                out = os.path.join(work, f"{component}_{depth}_converted")
                os.makedirs(src, exist_ok=True)
                with open(os.path.join(src, "config.json"), "w") as f:
                    json.dump(config, f)
                size = write_safetensors(os.path.join(src, filename), shapes, args.dtype)
                code, rss = peak_rss_of([sys.executable, os.path.join(REPO, "scripts", "convert_flux.py"),
                                         "--source", src, "--components", component, "--output", out,
                                         "--quiet", "--overwrite"])
                if code:
                    print(f"conversion of {src} failed", file=sys.stderr)
                    return code
                largest = max(int(np.prod(s)) for s in shapes.values()) * itemsize
                rows.append((component, depth, size, rss, largest))
                shutil.rmtree(src)
                shutil.rmtree(out)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"baseline (imports only): peak RSS {baseline / 2**20:.0f} MiB; dtype {args.dtype}")
    print(f"{'component':>9} {'blocks':>6} {'file MiB':>9} {'peak RSS MiB':>13} {'RSS - baseline':>15} "
          f"{'largest tensor MiB':>19}")
    for component, depth, size, rss, largest in rows:
        print(f"{component:>9} {depth:>6} {size / 2**20:>9.0f} {rss / 2**20:>13.0f} {(rss - baseline) / 2**20:>15.0f} "
              f"{largest / 2**20:>19.0f}")
    for component in components:
        (_, _, s0, r0, _), (_, _, s1, r1, _) = [r for r in rows if r[0] == component]
        print(f"{component}: peak RSS growth / extra file size = {(r1 - r0) / (s1 - s0):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
