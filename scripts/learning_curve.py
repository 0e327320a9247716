"""Learning curves of a run: every kept checkpoint decomposed on the same images, background RMSE against
the identity's (returning the composite), per task.

    python scripts/learning_curve.py --run RUN --output DIR --data DATA [--split test] [--limit 64]
    python scripts/learning_curve.py --run RUN --output DIR --procedural 32 [--size 64] [--style classic+photo]

`--procedural N` draws N images per task from the synthesizer's validation stream (never trained on: runs
read its train stream). Writes DIR/curve.json (per step: the mean training loss around it, the ratio per
task and their mean) and DIR/curve.png (training loss and ratios against steps); an existing file is
replaced only with --overwrite. Ratio < 1: the model's background is closer to the truth than the composite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dd_jax import checkpoints, flow, inference, outdir  # noqa: E402
from dd_jax.data import blend  # noqa: E402


def examples(args, tasks: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(task, composite, background) in [0, 1]."""
    out = []
    for t in tasks:
        if args.procedural:
            from dd_jax.data import procedural

            src = procedural.ProceduralSource([t], args.size, args.size, seed=args.seed, split="validation",
                                              style=args.style)
            out += [(t, src[i]["composite"] / 255.0, src[i]["background"] / 255.0) for i in range(args.procedural)]
        else:
            from dd_jax.data import pipeline

            ex = pipeline.Examples(args.data, t, args.split, args.limit)
            out += [(t, ex[i]["composite"], ex[i]["background"]) for i in range(len(ex))]
    return out


def ratios(system, items, steps: int, seed: int) -> dict[str, float]:
    """Per task: the model's mean background RMSE over the identity's (as `dd_jax.evaluate` reports it)."""
    import jax

    per: dict[str, list[tuple[float, float]]] = {}
    stream = ((i, comp.astype(np.float32), t) for i, (t, comp, _) in enumerate(items))
    for i, layers in inference.decompose_stream(system, stream, steps=steps, key=jax.random.key(seed)):
        t, comp, bg = items[i]
        per.setdefault(t, []).append((blend.rmse(layers.background, bg), blend.rmse(comp, bg)))
    return {t: float(np.mean([m for m, _ in v]) / max(np.mean([i for _, i in v]), 1e-9)) for t, v in per.items()}


def mean_losses(run: str, steps: list[int], window: int) -> dict[int, float]:
    losses = {}
    path = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    losses[int(r["step"])] = float(r["loss"])
                except (ValueError, KeyError):
                    continue
    return {s: float(np.mean([v for k, v in losses.items() if s - window < k <= s] or [np.nan])) for s in steps}


def plot(curve: list[dict], path: str) -> None:
    """A small line chart with PIL: loss (left panel), ratio per task (right panel)."""
    from PIL import Image, ImageDraw

    w, h, pad = 900, 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    steps = [c["step"] for c in curve]
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (0, 0, 0)]
    panels = [("training loss", {"loss": [c["loss"] for c in curve]}),
              ("background RMSE / identity", {**{t: [c["ratios"].get(t, np.nan) for c in curve]
                                                 for t in curve[0]["ratios"]},
                                              "mean": [c["mean_ratio"] for c in curve]})]
    for k, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = pad + k * w // 2, (k + 1) * w // 2 - 20, pad, h - pad
        vals = [v for s in series.values() for v in s if np.isfinite(v)]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 10), title, fill="black")
        d.text((x0 - 45, y0), f"{hi:.3g}", fill="black")
        d.text((x0 - 45, y1 - 10), f"{lo:.3g}", fill="black")
        d.text((x0, y1 + 5), str(min(steps)), fill="black")
        d.text((x1 - 30, y1 + 5), str(max(steps)), fill="black")
        span = max(max(steps) - min(steps), 1)
        for j, (name, ys) in enumerate(series.items()):
            pts = [(x0 + (x1 - x0) * (s - min(steps)) / span, y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for s, v in zip(steps, ys) if np.isfinite(v)]
            color = colors[j % len(colors)] if name != "mean" else (0, 0, 0)
            if len(pts) > 1:
                d.line(pts, fill=color, width=3 if name == "mean" else 2)
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
            d.text((x1 - 110, y0 + 5 + 12 * j), name, fill=color)
    img.save(path, format="PNG")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/learning_curve.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a training workdir with several checkpoints")
    ap.add_argument("--output", required=True, help="folder for curve.json and curve.png")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="built data (python -m dd_jax.data.build)")
    src.add_argument("--procedural", type=int, metavar="N", help="N synthesized images per task")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=64, help="--data: first N examples per task")
    ap.add_argument("--size", type=int, default=64, help="--procedural: image size")
    ap.add_argument("--style", default="classic+photo", help="--procedural: synthesizer style(s)")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: the run's data.tasks")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        config = checkpoints.load_config(os.path.join(args.run, checkpoints.CONFIG_FILE))
        tasks = args.tasks or ([config.data.tasks] if isinstance(config.data.tasks, str) else list(config.data.tasks))
        tasks = list(blend.TASKS) if tasks == ["all"] else tasks
        ckpts = checkpoints.Checkpoints(os.path.join(args.run, checkpoints.CHECKPOINTS), read_only=True)
        steps = sorted(ckpts.steps())
        if not steps:
            raise checkpoints.RunError(f"{args.run}: no checkpoints")
        items = examples(args, tasks)
        system = checkpoints.load_trained(args.run, load_weights=False, log=lambda _: None)
        abstract = checkpoints.train_state(system, flow.system_optimizer(system))
        losses = mean_losses(args.run, steps, config.train.log_every)
        curve = []
        for step in steps:
            from flax import nnx

            state, _ = ckpts.restore(step, abstract)
            nnx.update(system.model, state["params"])
            r = ratios(system, items, args.steps or config.sample.steps, args.seed)
            mean = float(np.mean(list(r.values())))
            curve.append({"step": step, "loss": losses[step], "ratios": r, "mean_ratio": mean})
            print(f"step {step}: loss {losses[step]:.4f}  mean ratio {curve[-1]['mean_ratio']:.3f}  "
                  + "  ".join(f"{t} {v:.3f}" for t, v in r.items()), file=sys.stderr, flush=True)
        ckpts.close()
        os.makedirs(args.output, exist_ok=True)
        text = json.dumps({"run": os.path.abspath(args.run), "images": len(items), "tasks": tasks,
                           "source": f"procedural {args.style} {args.size}px validation x{args.procedural}"
                           if args.procedural else f"{args.data} {args.split} (limit {args.limit})",
                           "curve": curve}, indent=1)
        outdir.write_files([(os.path.join(args.output, "curve.json"), lambda p: open(p, "w").write(text)),
                            (os.path.join(args.output, "curve.png"), lambda p: plot(curve, p))],
                           overwrite=args.overwrite)
    except (checkpoints.RunError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {checkpoints.one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}/curve.json, curve.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
