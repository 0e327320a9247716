"""Held-out real photos with overlays the training data never draws, decomposed at their own size.

  python scripts/eval_photos.py --output docs/real_photos [--checkpoint RUN_OR_MODEL] [--keep DIR]

The photos are the bundled ones that "photo"-style training data leaves out
(`dd_jax.data.backgrounds.HELD_OUT_PHOTOS`), at their native resolution. The
overlays are drawn here, by code the data generator does not share, in faces
it never uses (`raster.HELD_OUT_FONTS`):
- watermark: a tiled diagonal text in outlined letters, a corner stamp (a
  ring with text on it) with a copyright line, a knocked-out banner across the
  photo, and a large centred word; each at its own opacity;
- flare: a glow with a six-point star, a horizontal streak and a chain of
  hexagonal ghosts (additive light in linear space, the flare law);
- glassware and occlusion: the generator's layers over these held-out photos.

Each composite is decomposed with `python -m dd_jax.decompose` (its
defaults: what a user gets) and scored by background RMSE (0-255) against the
true photo, beside the identity baseline (the composite itself). It writes
report.md, results.json and contact.png (input | background | foreground per
case, scaled down to fit) to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dd_jax.data import backgrounds, blend, fg_layers, fg_objects, raster  # noqa: E402


def _font(size: float, k: int = 0) -> raster.Font:
    faces = raster.held_out_fonts()
    return raster.Font(faces[k % len(faces)] if faces else "", size)


def _rgba(mask: np.ndarray, colour, opacity: float) -> np.ndarray:
    return raster.layer(np.clip(mask, 0, 1) * opacity, colour)


def tiled_outline(h: int, w: int) -> np.ndarray:
    """Rows of outlined text at -30 degrees (the letters' rims only)."""
    d = int(np.hypot(h, w)) + 2
    f = _font(38, 1)
    full, inner = raster.Canvas(d, d), raster.Canvas(d, d)
    for j, y in enumerate(range(0, d, 110)):
        for x in range(-200 + (j % 2) * 150, d, 330):
            full.text((x, y), "PROOF COPY", f, anchor="lm", stroke=2.0)
            inner.text((x, y), "PROOF COPY", f, anchor="lm")
    ring = raster.rotate(np.clip(full.mask() - inner.mask(), 0, 1), -30)
    y0, x0 = (d - h) // 2, (d - w) // 2
    return _rgba(ring[y0:y0 + h, x0:x0 + w], (1.0, 1.0, 1.0), 0.55)


def corner_stamp(h: int, w: int) -> np.ndarray:
    """A ring stamp with letters around it in the lower right, and a copyright line beside it."""
    c = raster.Canvas(h, w)
    r = 0.09 * min(h, w) + 20
    cx, cy = w - r - 18, h - r - 18
    c.ellipse(cx, cy, r, r, width=3)
    c.ellipse(cx, cy, 0.62 * r, 0.62 * r, width=2)
    for i, ch in enumerate("ORIGINAL PHOTO "):
        a = 2 * np.pi * i / 15
        c.text((cx + 0.81 * r * np.sin(a), cy - 0.81 * r * np.cos(a)), ch, _font(0.2 * r, 2))
    c.text((cx - r - 12, cy + 0.5 * r), "(c) 2026 M. Okafor", _font(17, 3), anchor="rm")
    return _rgba(c.mask(), (0.1, 0.1, 0.12), 0.45)


def banner(h: int, w: int) -> np.ndarray:
    """A translucent band across the photo with the text knocked out of it."""
    band = np.zeros((h, w), np.float32)
    y0, y1 = int(0.42 * h), int(0.58 * h)
    band[y0:y1] = 1.0
    text = raster.Canvas(h, w).text((w / 2, (y0 + y1) / 2), "S A M P L E", _font(0.11 * h, 0)).mask()
    return _rgba(band * (1 - text), (0.95, 0.95, 0.95), 0.35)


def centred_word(h: int, w: int) -> np.ndarray:
    """A large faint word in the middle, slightly rotated."""
    m = raster.Canvas(h, w).text((w / 2, h / 2), "Lumenwise", _font(0.16 * w, 1)).mask()
    return _rgba(raster.rotate(m, 12), (1.0, 0.9, 0.3), 0.3)


def hex_flare(h: int, w: int) -> np.ndarray:
    """Glow + six-point star + horizontal streak + a chain of hexagonal ghosts, as emitted light."""
    sy, sx = 0.22 * h, 0.72 * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - sx, yy - sy
    r = np.hypot(dx, dy) + 1e-3
    light = 1.2 * np.exp(-(r / 14) ** 2) + 0.5 / (1 + (r / 90) ** 2) ** 1.5
    th = np.arctan2(dy, dx)
    star = np.maximum(0, np.cos(3 * th)) ** 60 * np.exp(-r / 160)
    streak = np.exp(-(dy / 3.0) ** 2) * np.exp(-np.abs(dx) / (0.35 * w))
    light = light[..., None] * np.array([1.0, 0.9, 0.75]) + 0.6 * star[..., None] * np.array([1, 1, 1.0]) \
        + 0.5 * streak[..., None] * np.array([0.6, 0.75, 1.0])
    for t, rad, col in ((0.5, 22, (0.3, 1.0, 0.5)), (0.9, 40, (1.0, 0.5, 0.8)), (1.4, 30, (0.5, 0.7, 1.0)),
                        (1.8, 60, (1.0, 0.8, 0.4))):
        gx, gy = sx + t * (w / 2 - sx), sy + t * (h / 2 - sy)
        pts = [(gx + rad * np.cos(a), gy + rad * np.sin(a)) for a in np.arange(6) * np.pi / 3]
        disc = raster.blur(raster.Canvas(h, w).polygon(pts).mask(), 2.0)
        light = light + 0.07 * disc[..., None] * np.asarray(col)
    display = blend.from_linear(np.clip(light, 0, 1)).astype(np.float32)
    return blend.emission_to_rgba(np.where(display < 1.5 / 255, 0.0, display).astype(np.float32))


WATERMARKS = {"tiled outline text": tiled_outline, "corner stamp + line": corner_stamp,
              "knocked-out banner": banner, "large centred word": centred_word}


def cases() -> list[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(name, task, style, composite, background) float32 [0, 1], every held-out photo x overlay."""
    out = []
    for k, photo in enumerate(backgrounds.HELD_OUT_PHOTOS):
        img = backgrounds.package_image(photo)
        if img is None:
            continue
        bg = img.astype(np.float32) / 255.0
        h, w = bg.shape[:2]
        stem = photo.split(".")[0]
        layers = [(f"watermark: {n}", "watermark", f(h, w)) for n, f in WATERMARKS.items()]
        layers.append(("flare: hex ghosts + streak", "flare", hex_flare(h, w)))
        rng = np.random.default_rng(1000 + k)
        layers.append(("glassware: generator", "glassware", fg_objects.glassware(rng, h, w)[0]))
        layers.append(("occlusion: generator", "occlusion", fg_layers.occlusion(rng, h, w, scale=1.0)[0]))
        for name, task, fg in layers:
            bg8 = raster.to_uint8(bg)
            fg8 = blend.quantize_rgba(fg)
            comp = blend.composite(task, fg8.astype(np.float32) / 255.0, bg8.astype(np.float32) / 255.0)
            out.append((f"{stem}", name, task, raster.to_uint8(comp), bg8))
    return out


def contact(rows: list[list[np.ndarray]], width: int = 900) -> Image.Image:
    """One row per case: the images side by side, scaled to `width`, 4 px gaps."""
    out = []
    for imgs in rows:
        h = imgs[0].shape[0]
        gap = np.full((h, 4, 3), 255, np.uint8)
        line = np.concatenate([x for im in imgs for x in (im, gap)][:-1], 1)
        im = Image.fromarray(line)
        out.append(im.resize((width, max(1, round(width * im.height / im.width))), Image.LANCZOS))
    sheet = Image.new("RGB", (width, sum(o.height + 6 for o in out)), "white")
    y = 0
    for o in out:
        sheet.paste(o, (0, y))
        y += o.height + 6
    return sheet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint", default=None, help="a run or model folder (default: the shipped model)")
    p.add_argument("--keep", default=None, help="keep the composites and layers in this folder")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's sample.steps)")
    p.add_argument("--auto-task", action="store_true",
                   help="also decompose every case with the task chosen automatically, and report how often the "
                        "choice is right")
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    work = args.keep or tempfile.mkdtemp(prefix="eval_photos_")
    inp, outp = os.path.join(work, "input"), os.path.join(work, "layers")
    os.makedirs(inp, exist_ok=True)
    all_cases = cases()
    by_task: dict[str, list[str]] = {}
    for i, (_photo, _name, task, comp, _) in enumerate(all_cases):
        path = os.path.join(inp, f"case{i:02d}.png")
        Image.fromarray(comp).save(path)
        by_task.setdefault(task, []).append(path)
    options = (["--checkpoint", args.checkpoint] if args.checkpoint else []) + \
        (["--steps", str(args.steps)] if args.steps else [])
    for task, paths in by_task.items():
        subprocess.run([sys.executable, "-m", "dd_jax.decompose", "--input", *paths, "--output", outp, "--task", task,
                        *options], check=True)
    chosen = auto_tasks(sorted(p for ps in by_task.values() for p in ps), os.path.join(work, "auto"), options) \
        if args.auto_task else {}
    results, rows = [], []
    for i, (photo, name, task, comp, bg) in enumerate(all_cases):
        pred = np.asarray(Image.open(os.path.join(outp, f"case{i:02d}_background.png")).convert("RGB"))
        fg = Image.open(os.path.join(outp, f"case{i:02d}_foreground.png"))
        fg_rgb = np.asarray(Image.alpha_composite(Image.new("RGBA", fg.size, (128, 128, 128, 255)),
                                                  fg.convert("RGBA")).convert("RGB"))
        model, ident = blend.rmse(pred, bg), blend.rmse(comp, bg)
        results.append({"case": i, "photo": photo, "overlay": name, "task": task, "size": list(comp.shape[:2]),
                        "bg_rmse_model": model, "bg_rmse_identity": ident, "ratio": model / max(ident, 1e-9)})
        if chosen:
            results[-1]["auto_task"] = chosen[f"case{i:02d}.png"]
        rows.append([comp, pred, fg_rgb])
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    contact(rows).save(os.path.join(args.output, "contact.png"), optimize=True)
    lines = ["# Held-out real photos", "", "Generated by `python scripts/eval_photos.py --output "
             f"{args.output}` (see its docstring for how the photos and overlays were made). Background "
             "RMSE on 0-255 against the true photo; ratio = model / identity (the composite itself).", "",
             "| photo | size | overlay | bg RMSE model | bg RMSE identity | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['photo']} | {r['size'][1]}x{r['size'][0]} | {r['overlay']} | {r['bg_rmse_model']:.2f} | "
                     f"{r['bg_rmse_identity']:.2f} | {r['ratio']:.3f} |")
    lines += ["", "| task | cases | mean ratio | worst ratio |", "| --- | --- | --- | --- |"]
    for task in by_task:
        rs = [r["ratio"] for r in results if r["task"] == task]
        lines.append(f"| {task} | {len(rs)} | {np.mean(rs):.3f} | {max(rs):.3f} |")
    if chosen:
        right = [r["auto_task"] == r["task"] for r in results]
        lines += ["", f"Automatic task choice (`decompose` without `--task`): right for {sum(right)} of {len(right)} "
                  f"cases ({np.mean(right):.0%}).", "", "| task | cases | chosen |", "| --- | --- | --- |"]
        for task in by_task:
            picks = [r["auto_task"] for r in results if r["task"] == task]
            counts = ", ".join(f"{t} {picks.count(t)}" for t in sorted(set(picks)))
            lines.append(f"| {task} | {len(picks)} | {counts} |")
    lines += ["", "![contact sheet: input | background | foreground](contact.png)", ""]
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[lines.index("| task | cases | mean ratio | worst ratio |"):-2]))
    return 0


def auto_tasks(paths: list[str], output: str, options: list[str]) -> dict[str, str]:
    """Decomposes `paths` with no --task (the task chosen automatically) into `output`; file name -> task chosen,
    read from the run's sidecar."""
    subprocess.run([sys.executable, "-m", "dd_jax.decompose", "--input", *paths, "--output", output, *options],
                   check=True)
    sidecars = sorted(f for f in os.listdir(output) if f.startswith("decompose_") and f.endswith(".json"))
    with open(os.path.join(output, sidecars[-1])) as f:
        return {os.path.basename(r["input"]): r["task"] for r in json.load(f)["images"]}


if __name__ == "__main__":
    sys.exit(main())
