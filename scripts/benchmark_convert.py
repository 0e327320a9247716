#!/usr/bin/env python
"""Peak memory of checkpoint conversion: does it follow the largest tensor, not the model?

Writes synthetic BFL-named Flux checkpoints at flux-dev width (hidden 3072)
with 2 and with 4 double blocks (plus single blocks), converts each in a
fresh subprocess, and prints file sizes and the converter's peak RSS:

    python scripts/benchmark_convert.py [--dtype bfloat16] [--singles 2] [--workdir DIR]

The synthetic files are written tensor by tensor too, so this script itself
never holds a whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ST_DTYPE = {"bfloat16": ("BF16", ml_dtypes.bfloat16), "float32": ("F32", np.float32)}


def bfl_shapes(hidden=3072, heads=24, depth=2, singles=2, context=4096, vec=768, channels=64, mlp_ratio=4.0):
    mlp = int(hidden * mlp_ratio)
    hd = hidden // heads
    lin = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    s = {}
    s.update(lin("img_in", channels, hidden))
    s.update(lin("txt_in", context, hidden))
    for e, i in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):
        s.update(lin(f"{e}.in_layer", i, hidden))
        s.update(lin(f"{e}.out_layer", hidden, hidden))
    for n in range(depth):
        for st in ("img", "txt"):
            b = f"double_blocks.{n}.{st}"
            s.update(lin(f"{b}_mod.lin", hidden, 6 * hidden))
            s.update(lin(f"{b}_attn.qkv", hidden, 3 * hidden))
            s.update(lin(f"{b}_attn.proj", hidden, hidden))
            s[f"{b}_attn.norm.query_norm.scale"] = (hd,)
            s[f"{b}_attn.norm.key_norm.scale"] = (hd,)
            s.update(lin(f"{b}_mlp.0", hidden, mlp))
            s.update(lin(f"{b}_mlp.2", mlp, hidden))
    for n in range(singles):
        b = f"single_blocks.{n}"
        s.update(lin(f"{b}.linear1", hidden, 3 * hidden + mlp))
        s.update(lin(f"{b}.linear2", hidden + mlp, hidden))
        s.update(lin(f"{b}.modulation.lin", hidden, 3 * hidden))
        s[f"{b}.norm.query_norm.scale"] = (hd,)
        s[f"{b}.norm.key_norm.scale"] = (hd,)
    s.update(lin("final_layer.linear", hidden, channels))
    s.update(lin("final_layer.adaLN_modulation.1", hidden, 2 * hidden))
    return s


def write_safetensors(path: str, shapes: dict, dtype: str, seed: int = 0) -> int:
    """Streams random tensors into a safetensors file; returns its size."""
    tag, npdt = _ST_DTYPE[dtype]
    itemsize = np.dtype(npdt).itemsize
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _name, shape in shapes.items():
            f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(npdt).tobytes())
    return os.path.getsize(path)


def peak_rss_of(cmd: list[str]) -> tuple[int, int]:
    """Runs cmd; returns (exit code, the child's peak RSS in bytes) from its own rusage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode())
    return proc.returncode, usage.ru_maxrss * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(_ST_DTYPE), default="bfloat16")
    ap.add_argument("--singles", type=int, default=2)
    ap.add_argument("--depths", default="2,4", help="double-block counts to compare")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp folder)")
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="dd_jax_bench_convert_")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for depth in (int(d) for d in args.depths.split(",")):
            src = os.path.join(work, f"flux_d{depth}.safetensors")
            out = os.path.join(work, f"converted_d{depth}")
            size = write_safetensors(src, bfl_shapes(depth=depth, singles=args.singles), args.dtype)
            code, rss = peak_rss_of([sys.executable, os.path.join(REPO, "scripts", "convert_flux.py"),
                                     "--source", src, "--output", out, "--quiet", "--overwrite"])
            if code:
                print(f"conversion of {src} failed", file=sys.stderr)
                return code
            largest = max(int(np.prod(s)) for s in bfl_shapes(depth=depth, singles=args.singles).values())
            rows.append((depth, size, rss, largest * np.dtype(_ST_DTYPE[args.dtype][1]).itemsize))
            os.remove(src)
            shutil.rmtree(out)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'double':>6} {'singles':>7} {'file MiB':>10} {'peak RSS MiB':>13} {'largest tensor MiB':>19}")
    for depth, size, rss, largest in rows:
        print(f"{depth:>6} {args.singles:>7} {size / 2**20:>10.0f} {rss / 2**20:>13.0f} {largest / 2**20:>19.0f}")
    if len(rows) >= 2:
        (_, s0, r0, _), (_, s1, r1, _) = rows[0], rows[-1]
        ratio = (r1 - r0) / (s1 - s0)
        print(f"peak RSS growth / extra file size = {ratio:.3f} (target < 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
