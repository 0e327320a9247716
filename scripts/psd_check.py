"""How well decompose's layered PSDs composite back to the input, per task, on a built test split.

  python scripts/psd_check.py --data data/eval_photo64 [--limit 32] [--checkpoint MODEL] [--steps N] [--json OUT]

For every example of each task's test split it measures, RMSE and max on 0-255:

- truth, PSD: the true layers (8-bit background and RGBA foreground, as
  decompose writes them) laid out as `dd_jax.psd_layers` lays them out,
  written to a PSD, read back and composited by psd-tools
  (`PSDImage.composite`), against the input: what the PSD layering itself
  costs (modes and 8-bit rounding), whatever the model;
- truth, law: the same 8-bit layers under the task's blend law (the PNGs'
  error; the floor the PSD can reach);
- light on black, Add (cell, flare): the foreground as the PNG holds it (alpha A on
  black) in Linear Dodge over the background, the background-independent
  layer that decompose does *not* use for flare: the error of adding in
  display values what the law adds in linear light;
- model (with --checkpoint or --model): the model's decomposition, the
  recomposition RMSE decompose reports (law on the written layers) and the
  psd-tools compositing of its PSD, both against the input.

Prints a table and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dd_jax import psd_layers
from dd_jax.data import blend


def to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)


def psd_error(folder: str, task: str, bg: np.ndarray, fg: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """(RMSE, max) on 0-1 of psd-tools' compositing of the PSD of these 8-bit layers against `image`."""
    path = os.path.join(folder, "check.psd")
    psd_layers.write(path, psd_layers.layers(task, bg, fg))
    rec = psd_layers.read_composite(path)
    return blend.rmse(rec, image), float(np.abs(rec - image).max())


def check(data: str, tasks, limit: int | None, system=None, steps: int | None = None, seed: int = 0,
          batch_size: int = 16) -> dict:
    from dd_jax.data.pipeline import Examples  # pylint: disable=g-import-not-at-top

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            ex = Examples(data, task, "test", limit)
            rows = {k: [] for k in ("truth_psd", "truth_psd_max", "truth_law", "add_on_black", "model_law",
                                    "model_psd", "model_psd_max")}
            items = [ex[i] for i in range(len(ex))]
            for e in items:
                image = e["composite"].astype(np.float64)
                bg, fg = to_u8(e["background"]), blend.quantize_rgba(e["foreground_rgba"])
                r, m = psd_error(tmp, task, bg, fg, image)
                rows["truth_psd"].append(r)
                rows["truth_psd_max"].append(m)
                rows["truth_law"].append(blend.layers_error(task, fg, bg, image))
                if task in blend.EMISSIVE:
                    rows["add_on_black"].append(psd_layers.addition_error(task, bg, fg, image))
            if system is not None:
                import jax  # pylint: disable=g-import-not-at-top

                from dd_jax import inference  # pylint: disable=g-import-not-at-top

                layers = inference.decompose_images(
                    system, [e["composite"] for e in items], [task] * len(items),
                    steps=steps or system.config.sample.steps, key=jax.random.key(seed), batch_size=batch_size)
                for e, lay in zip(items, layers):
                    image = e["composite"].astype(np.float64)
                    bg = to_u8(lay.background)
                    fg = None if lay.foreground is None else blend.quantize_rgba(np.asarray(
                        blend.foreground_rgba(task, lay.foreground, lay.composite, lay.background)))
                    if fg is None:
                        continue
                    rows["model_law"].append(blend.layers_error(task, fg, bg, image))
                    r, m = psd_error(tmp, task, bg, fg, image)
                    rows["model_psd"].append(r)
                    rows["model_psd_max"].append(m)
            agg = {"n": len(items)}
            for k, v in rows.items():
                if v:
                    agg[k] = round(float(np.max(v) if k.endswith("_max") else np.mean(v)) * 255, 3)
            out[task] = agg
            print(f"{task}: {agg}", file=sys.stderr, flush=True)
    return out


def table(res: dict) -> str:
    cols = [("truth_psd", "truth, PSD (psd-tools)"), ("truth_psd_max", "max"), ("truth_law", "truth, law"),
            ("add_on_black", "light on black, Add"), ("model_law", "model, law"), ("model_psd", "model, PSD"),
            ("model_psd_max", "max")]
    cols = [c for c in cols if any(c[0] in r for r in res.values())]
    lines = ["| task | n | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for t, r in res.items():
        lines.append(f"| {t} | {r['n']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c, _ in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="built AlphaBlend data (python -m dd_jax.data.build)")
    ap.add_argument("--tasks", nargs="+", default=list(blend.TASKS), choices=blend.TASKS)
    ap.add_argument("--limit", type=int, default=None, help="first N test examples per task")
    ap.add_argument("--model", action="store_true", help="also decompose with the shipped model")
    ap.add_argument("--checkpoint", default=None, help="also decompose with this model (implies --model)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    system = None
    if args.model or args.checkpoint:
        from dd_jax import checkpoints  # pylint: disable=g-import-not-at-top

        system = checkpoints.load_trained(args.checkpoint or checkpoints.DEFAULT_MODEL)
    res = check(args.data, args.tasks, args.limit, system, args.steps, args.seed, args.batch_size)
    print(f"RMSE against the input, 0-255 (max: largest pixel error), {args.data} test split\n")
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "limit": args.limit, "checkpoint": args.checkpoint, "tasks": res}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
