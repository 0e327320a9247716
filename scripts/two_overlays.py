"""Images with two overlays: does `decompose --passes 2` get nearer the true background than one pass?

  python scripts/two_overlays.py [--n 10] [--sizes 64 256] [--seed 9876] [--checkpoint MODEL] [--keep DIR]
                                 [--json OUT]

The composites come from the project's own generator (`dd_jax.data.synth`,
style classic, split test) with a seed no training or selection run used
(9876), over the bundled photos that photo-style training leaves out
(`backgrounds.HELD_OUT_PHOTOS`): for each pair (top over bottom) sample i of
the bottom task's generator gives the background and the first overlay
(composited with its law and rounded to 8 bits, as the generator stores it),
and sample i of the top task's generator gives the second overlay, composited
over that with its own law and rounded again. So the input is
law_top(fg_top, law_bottom(fg_bottom, background)): pass 1 should take off
the top overlay and pass 2 the bottom one.

Each set is decomposed with `python -m dd_jax.decompose`'s `run` at its
defaults (the shipped model unless --checkpoint; its mode, steps, seed 0)
four ways: `--passes 1 --task TOP` (one pass, the outer overlay's task);
`--passes 1 --task BOTTOM` (one pass, the inner overlay's task: what a single
pass with the other task gets); `--passes 2 --task TOP,BOTTOM`; and
`--passes 2` with both tasks chosen automatically (the file names name no
task). It prints background RMSE (0-255) against the true background, beside
the identity (the composite itself), per pair and size, and how often the
automatic choice named the right task in each pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dd_jax.data import backgrounds, blend, raster, synth  # noqa: E402

PAIRS = (("watermark", "flare"), ("watermark", "occlusion"))  # (top, bottom): the top overlay is applied last


def held_out_synth(task: str, size: int, seed: int) -> synth.Synthesizer:
    """The task's generator at `size`, its backgrounds the held-out bundled photos only."""
    s = synth.Synthesizer(task, size, size, seed=seed)
    everything = backgrounds.PackageBackgrounds().names
    s.bg_source = backgrounds.PackageBackgrounds(
        exclude=tuple(n for n in everything if n not in backgrounds.HELD_OUT_PHOTOS))
    return s


def two_overlays(top: str, bottom: str, size: int, n: int, seed: int):
    """n (composite, background) uint8 pairs: `top`'s overlay over `bottom`'s over a held-out photo."""
    low, high = held_out_synth(bottom, size, seed), held_out_synth(top, size, seed)
    for i in range(n):
        first = low.sample(i, "test")
        second = high.sample(i, "test").foreground
        comp = blend.composite(top, second.astype(np.float32) / 255.0, first.composite.astype(np.float32) / 255.0)
        yield raster.to_uint8(np.asarray(comp)), first.background


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="composites per pair and size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seed", type=int, default=9876, help="the generator's seed (never used for training)")
    ap.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    ap.add_argument("--keep", default=None, help="keep the composites and the outputs in this folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from dd_jax import decompose  # pylint: disable=g-import-not-at-top

    work = args.keep or tempfile.mkdtemp(prefix="two_overlays_")
    src = os.path.join(work, "input")
    os.makedirs(src, exist_ok=True)
    truth = {}  # file -> (pair, size, background)
    for top, bottom in PAIRS:
        for size in args.sizes:
            for i, (comp, bg) in enumerate(two_overlays(top, bottom, size, args.n, args.seed)):
                name = f"two_{top}-over-{bottom}_{size}_{i:02d}.png"  # starts with no task name: no file-name task
                path = os.path.join(src, name)
                if not os.path.exists(path):
                    Image.fromarray(comp).save(path)
                truth[path] = ((top, bottom), size, bg)
    runs = {"1 pass": dict(passes=1, task="top"), "1 pass, bottom task": dict(passes=1, task="bottom"),
            "2 passes": dict(passes=2, task="top,bottom"),
            "2 passes, auto": dict(passes=2, task=None)}
    bg_rmse = {r: {} for r in runs}
    chosen = {}
    for label, how in runs.items():
        for top, bottom in PAIRS:  # one run per pair (its own --task), every size at once
            files = [p for p, (pair, _, _) in truth.items() if pair == (top, bottom)]
            task = None if how["task"] is None else how["task"].replace("top", top).replace("bottom", bottom)
            out = os.path.join(work, label.replace(" ", "_").replace(",", ""), f"{top}-over-{bottom}")
            print(f"{label}, {top} over {bottom}: --passes {how['passes']} --task {task or '(automatic)'}",
                  file=sys.stderr, flush=True)
            summary = decompose.run(files, out, checkpoint=args.checkpoint, task=task, passes=how["passes"],
                                    overwrite=True)
            for rec in summary["images"]:
                pair, size, bg = truth[rec["input"]]
                got = np.asarray(Image.open(os.path.join(out, rec["outputs"]["background"])))
                bg_rmse[label].setdefault((pair, size), []).append(blend.rmse(got / 255.0, bg / 255.0) * 255)
                if task is None:
                    chosen.setdefault((pair, size), []).append([p["task"] for p in rec["passes"]])
    rows = []
    for top, bottom in PAIRS:
        for size in args.sizes:
            k = ((top, bottom), size)
            files = [p for p, (pair, s, _) in truth.items() if (pair, s) == k]
            identity = [blend.rmse(np.asarray(Image.open(p)) / 255.0, truth[p][2] / 255.0) * 255 for p in files]
            picks = chosen.get(k, [])
            rows.append({"pair": f"{top} over {bottom}", "size": size, "n": len(files),
                         "identity": float(np.mean(identity)),
                         **{r: float(np.mean(bg_rmse[r][k])) for r in runs},
                         "auto_pass1_right": sum(c[0] == top for c in picks),
                         "auto_pass2_right": sum(len(c) > 1 and c[1] == bottom for c in picks),
                         "auto_choices": [",".join(c) for c in picks]})
    print(f"\nbackground RMSE (0-255) against the true background; seed {args.seed}, held-out photos, "
          f"{args.checkpoint or 'shipped model'}\n")
    cols = ["identity"] + list(runs)
    print("| overlays (top over bottom) | size | n | " + " | ".join(cols) + " | auto task right, pass 1 / pass 2 |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        print(f"| {r['pair']} | {r['size']} | {r['n']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) +
              f" | {r['auto_pass1_right']} / {r['auto_pass2_right']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "checkpoint": args.checkpoint, "rows": rows}, f, indent=1)
    print(f"\ninputs and outputs in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
