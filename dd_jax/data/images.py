"""Robust reading of user image folders (backgrounds and RGBA foregrounds).

Every odd file is converted or skipped, never fatal: corrupt or truncated
files, grayscale and bilevel, 16-bit and float, palette (with or without
transparency), CMYK / YCbCr / LAB, images with alpha used as backgrounds,
animated files (first frame), EXIF rotation, and images too small for the
target size. What happened to each file is recorded in a ``FolderReport``
(counts by reason, shown in the build summary).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                        ".ppm", ".pgm", ".pbm", ".jp2", ".tga"})


@dataclasses.dataclass
class FolderReport:
    """Per-reason file sets: ``converted[reason]`` and ``skipped[reason]``."""

    folder: str = ""
    files: int = 0
    converted: dict[str, set[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    skipped: dict[str, set[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(set))

    def convert(self, reason: str, path: str) -> None:
        self.converted[reason].add(path)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason].add(path)

    def merge(self, events: Iterable[tuple[str, str, str]]) -> None:
        """Adds (kind, reason, path) events reported by worker processes."""
        for kind, reason, path in events:
            (self.converted if kind == "converted" else self.skipped)[reason].add(path)

    def counts(self) -> dict:
        return {"folder": self.folder, "files": self.files,
                "usable": self.files - len(set().union(*self.skipped.values()) if self.skipped else set()),
                "converted": {k: len(v) for k, v in sorted(self.converted.items())},
                "skipped": {k: len(v) for k, v in sorted(self.skipped.items())}}


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted, hidden files ignored)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS:
                out.append(os.path.join(root, f))
    return sorted(out)


def scan(folder: str, min_side: int, report: FolderReport) -> list[str]:
    """Header-only check of every file: returns the usable ones (cheap, no decode)."""
    report.folder = folder
    paths = list_images(folder)
    report.files = len(paths)
    good = []
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(p) as im:
                    size = im.size
        except Exception:  # pylint: disable=broad-except
            report.skip("corrupt", p)
            continue
        if min(size) < min_side:
            report.skip("tiny", p)
            continue
        good.append(p)
    return good


def _to_8bit(im: Image.Image, path: str, events: list) -> Image.Image:
    """Maps high bit-depth single-channel modes to 8-bit 'L'."""
    a = np.asarray(im)
    if im.mode == "F":
        scale = 1.0 if float(np.nanmax(a)) <= 1.0 else 255.0
        events.append(("converted", "float", path))
        a = np.nan_to_num(a) / scale * 255.0
    else:
        events.append(("converted", "16bit", path))
        top = 65535.0 if (a.dtype.itemsize >= 2 and a.max() > 255) else 255.0
        a = a.astype(np.float64) / top * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _open(path: str, events: list, draft_hw=None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(path)
        if getattr(im, "n_frames", 1) > 1:
            events.append(("converted", "animated", path))
            im.seek(0)
        if draft_hw is not None and im.format == "JPEG":
            im.draft("RGB", (draft_hw[1], draft_hw[0]))  # fast DCT downscale of big JPEGs
        im.load()
        im = ImageOps.exif_transpose(im)
    return im


def _normalize_mode(im: Image.Image, path: str, events: list) -> Image.Image:
    """Any PIL mode to 'RGB' or 'RGBA' (keeping alpha when there is one)."""
    mode = deep = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im, path, events)
        mode = "L"
    if mode == "P":
        events.append(("converted", "palette", path))
        has_t = "transparency" in im.info
        return im.convert("RGBA" if has_t else "RGB")
    if mode in ("1", "L"):
        if deep == mode:  # not already counted as 16-bit / float
            events.append(("converted", "grayscale", path))
        return im.convert("RGB")
    if mode in ("LA", "La", "PA"):
        events.append(("converted", "grayscale", path))
        return im.convert("RGBA")
    if mode == "CMYK":
        events.append(("converted", "cmyk", path))
        return im.convert("RGB")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode in ("RGB", "RGBA"):
        return im
    events.append(("converted", mode.lower(), path))  # YCbCr, LAB, HSV, I;16 RGB, ...
    return im.convert("RGB")


def load_rgb(path: str, events: list, min_side: int = 1, draft_hw=None) -> np.ndarray | None:
    """uint8 [H, W, 3], or None (with a 'skipped' event) when unusable.

    Background images with alpha are flattened over white (how a viewer shows them).
    """
    try:
        im = _normalize_mode(_open(path, events, draft_hw), path, events)
        if im.mode == "RGBA":
            events.append(("converted", "rgba", path))
            flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(flat, im).convert("RGB")
        a = np.asarray(im, np.uint8)
    except Exception:  # pylint: disable=broad-except  # truncated / undecodable
        events.append(("skipped", "corrupt", path))
        return None
    if min(a.shape[:2]) < min_side:
        events.append(("skipped", "tiny", path))
        return None
    return a


def load_rgba(path: str, events: list, min_side: int = 1, emission: bool = False) -> np.ndarray | None:
    """uint8 [H, W, 4] foreground, or None.

    Files without alpha are skipped ('no_alpha'), except for emission tasks
    (``emission=True``: flare, cell) where an RGB image on black *is* the
    layer: alpha = max channel, colour = rgb / alpha (as Flare7K ships flares).
    """
    try:
        im = _normalize_mode(_open(path, events), path, events)
        a = np.asarray(im, np.uint8)
    except Exception:  # pylint: disable=broad-except
        events.append(("skipped", "corrupt", path))
        return None
    if min(a.shape[:2]) < min_side:
        events.append(("skipped", "tiny", path))
        return None
    if a.shape[-1] == 4:
        if a[..., 3].max() == 0:
            events.append(("skipped", "empty_alpha", path))
            return None
        return a
    if not emission:
        events.append(("skipped", "no_alpha", path))
        return None
    events.append(("converted", "emission", path))
    f = a.astype(np.float32) / 255.0
    alpha = f.max(-1, keepdims=True)
    rgb = np.where(alpha > 0, f / np.maximum(alpha, 1e-6), 0.0)
    return np.clip(np.rint(np.concatenate([rgb, alpha], -1) * 255), 0, 255).astype(np.uint8)


def sidecar_caption(path: str) -> str | None:
    """The text of ``<stem>.txt`` next to an image, if any (first line)."""
    txt = os.path.splitext(path)[0] + ".txt"
    try:
        with open(txt, encoding="utf-8", errors="replace") as f:
            line = f.readline().strip()
        return line or None
    except OSError:
        return None
