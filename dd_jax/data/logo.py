"""TFDS builder ``logo``: the LOGO watermark benchmark (Cun & Pun, AAAI 2021)
from a manual directory, in the same features as ``alphablend``.

Layout (one folder per config; ``manual_dir`` may be the folder itself or
its parent)::

    10khigh/  (config high = LOGO-H)   10kmid/ (mid = LOGO-L)   10kgray/ (gray)
      natural/<COCO id>.jpg                       the clean image
      train_images/{image,mask,wm}/<COCO id>-<logo>-<n>.png
      val_images/{image,mask,wm}/...              -> split "test"

The benchmark stores the watermark's colour (``wm``) and its region
(``mask``) but not its opacity; we estimate one opacity per image by least
squares of image = (1 - a m) natural + a m wm over the mask and store the
foreground as RGBA (wm, a * mask), with the watermark law (alpha over).
Missing or unreadable files skip the example and are counted.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dd_jax.data import alphablend, blend, images

FOLDERS = {"high": "10khigh", "mid": "10kmid", "gray": "10kgray"}
SPLITS = {"train": "train_images", "test": "val_images"}


def estimate_opacity(image: np.ndarray, natural: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> float:
    """Least-squares a in image = natural + a m (wm - natural); floats in [0, 1]."""
    m = mask[..., None]
    d = m * (wm - natural)
    den = float((d * d).sum())
    if den < 1e-8:
        return 0.0
    return float(np.clip(((image - natural) * d).sum() / den, 0.0, 1.0))


def find_root(manual_dir: str, folder: str) -> str:
    for cand in (os.path.join(manual_dir, folder), manual_dir):
        if any(os.path.isdir(os.path.join(cand, s)) for s in SPLITS.values()):
            return cand
    raise FileNotFoundError(f"no LOGO folder {folder!r} (with train_images/ or val_images/) "
                            f"under {manual_dir!r}")


def _natural_path(root: str, coco_id: str) -> str | None:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG"):
        p = os.path.join(root, "natural", coco_id + ext)
        if os.path.exists(p):
            return p
    return None


def read_example(root: str, split_dir: str, stem: str, ext: str, gray: bool, events: list) -> dict | None:
    """One LOGO triple as an ``alphablend`` example, or None (with an event)."""
    base = os.path.join(root, split_dir)
    comp = images.load_rgb(os.path.join(base, "image", stem + ext), events)
    nat_path = _natural_path(root, stem.split("-")[0])
    nat = images.load_rgb(nat_path, events) if nat_path else None
    wm = images.load_rgb(os.path.join(base, "wm", stem + ".png"), events)
    mask_path = os.path.join(base, "mask", stem + ".png")
    try:
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L"), np.float32) / 255.0
    except Exception:  # pylint: disable=broad-except
        mask = None
    if comp is None or nat is None or wm is None or mask is None:
        events.append(("skipped", "missing_or_unreadable", stem))
        return None
    h, w = comp.shape[:2]
    fit = lambda a, mode="RGB": np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)) \
        if a.shape[:2] != (h, w) else a  # noqa: E731
    nat, wm = fit(nat), fit(wm)
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                          np.float32) / 255.0
    f = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
    a = estimate_opacity(f(comp), f(nat), f(wm), mask)
    alpha = np.clip(np.rint(a * mask * 255.0), 0, 255).astype(np.uint8)
    fg = np.concatenate([wm, alpha[..., None]], -1)
    fg[..., :3][alpha == 0] = 0
    kind = "gray " if gray else ""
    return {"composite": alphablend.png(comp), "background": alphablend.png(nat),
            "foreground": alphablend.png(fg),
            "caption": blend.caption(f"a semi-transparent {kind}logo watermark", "a natural photograph"),
            "task": "watermark"}


class Logo(alphablend._Builder):  # pylint: disable=protected-access
    """LOGO-H / LOGO-L / LOGO-Gray watermark removal benchmark."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k, description=f"LOGO {v}") for k, v in FOLDERS.items()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the LOGO benchmark folders (10khigh, 10kmid, 10kgray) from "
        "https://github.com/vinthony/deep-blind-watermark-removal in the manual dir.")

    def __init__(self, **kwargs):
        self.summary = {"examples": {}, "skipped": collections.Counter()}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0], features=alphablend.layer_features(),
            metadata=tfds.core.MetadataDict(summary=self.summary),
            homepage="https://github.com/vinthony/deep-blind-watermark-removal")

    def _split_generators(self, dl_manager):
        root = find_root(os.fspath(dl_manager.manual_dir), FOLDERS[self.builder_config.name])
        return {split: self._generate_examples(root, sub) for split, sub in SPLITS.items()
                if os.path.isdir(os.path.join(root, sub, "image"))}

    def _generate_examples(self, root: str, split_dir: str):
        gray = self.builder_config.name == "gray"
        files = sorted(f for f in os.listdir(os.path.join(root, split_dir, "image"))
                       if os.path.splitext(f)[1].lower() in images.IMAGE_EXTS)
        stems = (os.path.splitext(f) for f in files)
        reads = ((stem, lambda events, stem=stem, ext=ext: read_example(root, split_dir, stem, ext, gray, events))
                 for stem, ext in stems)
        return alphablend.counted_examples(self, split_dir, reads)
