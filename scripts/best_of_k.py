"""Does `decompose --num-samples K --select recompose` lower background RMSE? Measured on a built test split.

  python scripts/best_of_k.py --data data/eval_photo64 [--k 1 4 8] [--limit 8] [--checkpoint MODEL] [--json OUT]

Per task, every example is decomposed max(K) times (different noise, the
same fixed-shape batches decompose uses); for each K the first K samples are
taken, the one whose written layers recompose the input best
(`blend.layers_error`, decompose's selection) is kept, and its background
RMSE (0-255) against the true background is averaged. The oracle column is
the best background of the K (what a perfect selector would reach).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dd_jax.data import blend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tasks", nargs="+", default=list(blend.TASKS), choices=blend.TASKS)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import jax  # pylint: disable=g-import-not-at-top

    from dd_jax import checkpoints, inference  # pylint: disable=g-import-not-at-top
    from dd_jax.data.pipeline import Examples  # pylint: disable=g-import-not-at-top

    system = checkpoints.load_trained(args.checkpoint or checkpoints.DEFAULT_MODEL)
    steps = args.steps or system.config.sample.steps
    kmax = max(args.k)
    res = {}
    for task in args.tasks:
        ex = Examples(args.data, task, "test", args.limit)
        items = [ex[i] for i in range(len(ex))]
        stream = inference.decompose_stream(
            system, (((i, k), e["composite"], task) for i, e in enumerate(items) for k in range(kmax)),
            steps=steps, key=jax.random.key(args.seed), batch_size=args.batch_size)
        rec = np.zeros((len(items), kmax))
        bg_err = np.zeros((len(items), kmax))
        for (i, k), lay in stream:
            bg = np.clip(np.rint(lay.background * 255.0), 0, 255).astype(np.uint8)
            fg = blend.quantize_rgba(np.asarray(blend.foreground_rgba(task, lay.foreground, lay.composite,
                                                                      lay.background)))
            rec[i, k] = blend.layers_error(task, fg, bg, lay.composite)
            bg_err[i, k] = blend.rmse(bg / 255.0, items[i]["background"])
        row = {"n": len(items), "identity": round(float(np.mean(
            [blend.rmse(e["composite"], e["background"]) for e in items])) * 255, 3)}
        for k in args.k:
            pick = np.argmin(rec[:, :k], 1)
            row[f"K{k}"] = round(float(bg_err[np.arange(len(items)), pick].mean()) * 255, 3)
            row[f"K{k}_recompose"] = round(float(rec[np.arange(len(items)), pick].mean()) * 255, 3)
            row[f"K{k}_oracle"] = round(float(bg_err[:, :k].min(1).mean()) * 255, 3)
        res[task] = row
        print(f"{task}: {row}", file=sys.stderr, flush=True)
    cols = [f"K{k}" for k in args.k] + [f"K{k}_oracle" for k in args.k if k > 1]
    print(f"background RMSE (0-255) against the truth, {args.data} test split, {steps} steps; "
          f"K: best recomposition of K samples\n")
    print("| task | n | identity | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 3) + "|")
    for t, r in res.items():
        print(f"| {t} | {r['n']} | {r['identity']:.2f} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "steps": steps, "checkpoint": args.checkpoint, "tasks": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
