"""Contact sheets of AlphaBlend samples: one PNG per subtask, one row per
sample: composite | background | foreground (as the model sees it) |
foreground RGBA over a checkerboard.

  python scripts/contact_sheets.py --out docs/data [--rows 4] [--height 256 --width 256]
      [--tasks xray,cell] [--seed 0] [--backgrounds DIR] [--data-dir BUILD_OUT --split test]

Without --data-dir samples are synthesized on the spot; with it they are read
from a built dataset (``python -m dd_jax.data.build``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dd_jax.data import blend, raster, synth  # noqa: E402

COLUMNS = ("composite", "background", "foreground (target)", "foreground RGBA")


def checker(h: int, w: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 0.8, 0.6).astype(np.float32)


def row(task: str, comp: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """uint8 layers -> one float row of the sheet."""
    f = fg.astype(np.float32) / 255.0
    alone = blend.foreground_alone(task, f)
    over = blend.alpha_over(f[..., :3], f[..., 3:], checker(*fg.shape[:2]))
    gap = np.ones((comp.shape[0], 4, 3), np.float32)
    parts = [comp / 255.0, gap, bg / 255.0, gap, alone, gap, over]
    return np.concatenate([p.astype(np.float32) for p in parts], 1)


def sheet(task: str, rows: list[np.ndarray], width: int) -> Image.Image:
    body = np.concatenate([np.concatenate([r, np.ones((4,) + r.shape[1:], np.float32)], 0) for r in rows], 0)
    im = Image.fromarray(raster.to_uint8(body))
    head = 22
    out = Image.new("RGB", (im.width, im.height + head), "white")
    out.paste(im, (0, head))
    d = ImageDraw.Draw(out)
    font = raster.Font("", 13).at()
    for k, name in enumerate(COLUMNS):
        d.text((k * (width + 4) + 4, 4), f"{task}: {name}" if k == 0 else name, fill=(0, 0, 0), font=font)
    return out


def samples_from_dataset(data_dir: str, task: str, split: str, n: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from dd_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    path, _ = pipeline.find_dataset_dir(data_dir, task)
    src = tfds.builder_from_directory(path).as_data_source(split=split)
    for i in range(min(n, len(src))):
        ex = src[i]
        yield ex["composite"], ex["background"], ex["foreground"], ex["caption"].decode()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/data")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--tasks", default=",".join(blend.TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backgrounds", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--colors", type=int, default=0,
                   help="save as a palette PNG of this many colours (small files for docs)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for task in args.tasks.split(","):
        if args.data_dir:
            items = list(samples_from_dataset(args.data_dir, task, args.split, args.rows))
        else:
            s = synth.Synthesizer(task, args.height, args.width, backgrounds=args.backgrounds, seed=args.seed)
            items = []
            for i in range(args.rows):
                smp = s.sample(i, "test")
                items.append((smp.composite, smp.background, smp.foreground, smp.caption))
        rows = [row(task, c, b, f) for c, b, f, _ in items]
        path = os.path.join(args.out, f"contact_{task}.png")
        im = sheet(task, rows, items[0][0].shape[1])
        if args.colors:
            im = im.quantize(args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
        im.save(path, optimize=True)
        with open(os.path.join(args.out, f"contact_{task}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(x[3] for x in items) + "\n")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
