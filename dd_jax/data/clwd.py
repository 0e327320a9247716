"""TFDS builder ``clwd``: the CLWD watermark benchmark (Colored Large-scale
Watermark Dataset; Liu, Zhu & Bai, "WDNet: Watermark-Decomposition Network
for Visible Watermark Removal", WACV 2021) from a folder the user supplies.

Layout (``manual_dir`` may be the folder itself or its parent ``CLWD/``)::

    train/ test/
      Watermarked_image/<n>.jpg      the composite           -> composite
      Watermark_free_image/<n>.jpg   the clean image         -> background
      Watermark/<n>.png              the watermark's colour  -> foreground RGB
      Alpha/<n>.png                  its opacity (grey)      -> foreground alpha
      Mask/<n>.png                   its region (grey)       -> mask (RMSEw)

Files pair by name whatever their extension; folders whose names differ
are refused. The law is alpha over (``watermark``):
composite = (1 - Alpha) background + Alpha Watermark.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from dd_jax.data import alphablend, blend, images, public

FOLDERS = ("Watermarked_image", "Watermark_free_image", "Watermark", "Alpha", "Mask")
SPLITS = ("train", "test")


def find_root(manual_dir: str) -> str:
    for cand in (manual_dir, os.path.join(manual_dir, "CLWD")):
        if any(os.path.isdir(os.path.join(cand, s, FOLDERS[0])) for s in SPLITS):
            return cand
    raise public.SourceError(f"no CLWD tree under {manual_dir} (expected train/ or test/ holding "
                             f"{', '.join(FOLDERS)})")


def find_splits(manual_dir: str) -> dict[str, list]:
    root = find_root(manual_dir)
    return {s: public.pair(os.path.join(root, s), {f: "" for f in FOLDERS}, f"CLWD {s}")
            for s in SPLITS if os.path.isdir(os.path.join(root, s)) and os.listdir(os.path.join(root, s))}


def read_example(paths: dict[str, str], events: list) -> dict | None:
    """One CLWD example in the ``alphablend`` features plus ``mask`` [H, W, 1], or None (with an event)."""
    comp = images.load_rgb(paths["Watermarked_image"], events)
    bg = images.load_rgb(paths["Watermark_free_image"], events)
    wm = images.load_rgb(paths["Watermark"], events)
    alpha = public.load_gray(paths["Alpha"], events)
    mask = public.load_gray(paths["Mask"], events)
    if comp is None or bg is None or wm is None or alpha is None or mask is None:
        events.append(("skipped", "missing_or_unreadable", paths["Watermarked_image"]))
        return None
    h, w = comp.shape[:2]
    bg, wm, alpha = public.fit(bg, h, w), public.fit(wm, h, w), public.fit(alpha, h, w)
    mask = public.fit(mask, h, w, nearest=True)
    fg = np.concatenate([wm, alpha[..., None]], -1)
    fg[..., :3][alpha == 0] = 0
    return {"composite": alphablend.png(comp), "background": alphablend.png(bg), "foreground": alphablend.png(fg),
            "mask": alphablend.png(mask),  # grey PNG, read back as [H, W, 1]
            "caption": blend.caption("a semi-transparent coloured watermark", "a natural photograph"),
            "task": "watermark"}


class Clwd(public.PairedBuilder):
    """CLWD watermark removal benchmark (WDNet, WACV 2021), with alpha and watermark ground truth."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="CLWD train and test")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the CLWD folder (train/ and test/, from "
                                    "https://github.com/MRUIL/WDNet) in the manual dir.")
    MASK_CHANNELS = 1
    HOMEPAGE = "https://github.com/MRUIL/WDNet"

    def find_splits(self, source: str) -> dict[str, list]:
        return find_splits(source)

    def read(self, paths: dict[str, str], events: list) -> dict | None:
        return read_example(paths, events)
