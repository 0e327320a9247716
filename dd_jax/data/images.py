"""The one image reader (decompose's inputs, the data builder's user folders).

How a file is read: EXIF orientation is applied (a portrait photo comes back
upright); 16-bit images are scaled by their bit depth (65535 is white,
whatever the brightest pixel); float images (TIFF mode F) are read as they
are and must lie in [0, 1]: anything else (negative, above 1, NaN) is
refused with the reason, never rescaled by guess; grayscale, bilevel,
palette (with or without transparency), CMYK / YCbCr / LAB are converted to
RGB; alpha is kept for foregrounds and flattened over white otherwise;
animated files give their first frame. A file that cannot be read this way
raises ``ImageError`` whose text is the reason and what to do.

``read_rgb`` (decompose) returns float32 in [0, 1] at full precision. For
the builder, every odd file is converted or skipped, never fatal
(``load_rgb`` / ``load_rgba`` return None): what happened to each file is
recorded in a ``FolderReport`` (counts by reason, shown in the build
summary).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Iterable

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


class ImageError(ValueError):
    """A file that cannot be read as an image, or not without guessing. ``str(e)`` is the reason and what
    to do (callers name the file); ``e.code`` is the short reason counted in a build's ``FolderReport``."""

    def __init__(self, reason: str, code: str = "corrupt"):
        super().__init__(reason)
        self.code = code


_DEEP_INT = ("I;16", "I;16B", "I;16L", "I;16N")


def _int_bits(im: Image.Image, a: np.ndarray) -> int:
    """Bit depth of a mode-'I' image: from the file (PNG: 16; TIFF: BitsPerSample), else 16 when the
    values fit. Never guessed from the brightest pixel."""
    if im.format == "PNG":
        return 16
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 0 < bits <= 32:
        return bits
    if a.max(initial=0) <= 65535:
        return 16
    raise ImageError("32-bit integer image of unknown bit depth; save it as an 8- or 16-bit image", "int_range")


def _deep_to_float(im: Image.Image, path: str, events: list) -> np.ndarray:
    """Single-channel 16/32-bit integer or float modes -> float32 [H, W] in [0, 1], scaled by bit depth
    (integers) or read as they are (floats, which must lie in [0, 1])."""
    if im.mode == "F":
        a = np.asarray(im, np.float32)
        if not np.isfinite(a).all():
            raise ImageError("float image with values that are not finite (NaN or inf); save it with values in "
                             "[0, 1], or as an 8- or 16-bit image", "float_range")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"float image with values in [{lo:g}, {hi:g}], outside [0, 1] (floats are read as "
                             "they are, never rescaled); save it scaled to [0, 1], or as an 8- or 16-bit image",
                             "float_range")
        events.append(("converted", "float", path))
        return a
    a = np.asarray(im)
    if im.mode in _DEEP_INT:
        bits = 16
    else:  # "I": 32-bit signed storage of 16- or 32-bit data
        a = a.astype(np.int64)
        if a.min(initial=0) < 0:
            raise ImageError("integer image with negative values; save it as an 8- or 16-bit image", "int_range")
        bits = _int_bits(im, a)
        if a.max(initial=0) > 2 ** bits - 1:
            raise ImageError(f"integer image with values above its {bits}-bit range; save it as an 8- or 16-bit "
                             "image", "int_range")
    events.append(("converted", "16bit", path))
    return (a.astype(np.float64) / float(2 ** bits - 1)).astype(np.float32)


def _read(path: str, events: list, draft_hw=None, max_side: int | None = None) -> np.ndarray:
    """The one image reader: [H, W, 3 or 4] (alpha kept), uint8 for 8-bit sources, float32 in [0, 1] for
    deeper ones; EXIF orientation applied; first frame of animations. Raises ImageError."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
    except FileNotFoundError as e:
        raise ImageError("no such file", "missing") from e
    except IsADirectoryError as e:
        raise ImageError("is a folder, not an image file", "corrupt") from e
    except PermissionError as e:
        raise ImageError("permission denied; make it readable", "unreadable") from e
    except Image.DecompressionBombError as e:  # not an OSError: Pillow refuses > 2x MAX_IMAGE_PIXELS on open
        raise ImageError(f"too many pixels to read safely ({e}); downscale it", "too_large") from e
    except (Image.UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"not an image file this reader knows ({e}); convert it to PNG or JPEG",
                         "corrupt") from e
    with im:
        if max_side is not None and max(im.size) > max_side:
            raise ImageError(f"{im.size[0]}x{im.size[1]} is larger than {max_side} px on a side; downscale it",
                             "too_large")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if getattr(im, "n_frames", 1) > 1:
                    events.append(("converted", "animated", path))
                    im.seek(0)
                if draft_hw is not None and im.format == "JPEG":
                    im.draft("RGB", (draft_hw[1], draft_hw[0]))  # fast DCT downscale of big JPEGs
                im.load()
                im = ImageOps.exif_transpose(im)
        except Exception as e:  # pylint: disable=broad-except  # truncated / undecodable data
            raise ImageError(f"truncated or corrupt image data ({e}); re-save or replace the file",
                             "corrupt") from e
        if im.mode in _DEEP_INT + ("I", "F"):
            a = _deep_to_float(im, path, events)
            return np.repeat(a[..., None], 3, axis=-1)
        try:
            return np.asarray(_normalize_mode(im, path, events), np.uint8)
        except Exception as e:  # pylint: disable=broad-except  # a mode PIL cannot convert
            raise ImageError(f"image mode {im.mode!r} cannot be converted to RGB ({e}); save it as RGB",
                             "corrupt") from e


def _over_white(a: np.ndarray) -> np.ndarray:
    """[H, W, 4] straight alpha -> [H, W, 3] flattened over white, in the input's dtype scale."""
    if a.dtype == np.uint8:
        white = Image.new("RGBA", (a.shape[1], a.shape[0]), (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, Image.fromarray(a, "RGBA")).convert("RGB"), np.uint8)
    return a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _normalize_mode(im: Image.Image, path: str, events: list) -> Image.Image:
    """Any 8-bit PIL mode to 'RGB' or 'RGBA' (keeping alpha when there is one)."""
    mode = im.mode
    if mode == "P":
        events.append(("converted", "palette", path))
        has_t = "transparency" in im.info
        return im.convert("RGBA" if has_t else "RGB")
    if mode in ("1", "L"):
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
    events.append(("converted", mode.lower(), path))  # YCbCr, LAB, HSV, ...
    return im.convert("RGB")


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding its pixels (PIL opens lazily); None when it
    cannot be opened (reading it then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(os.fspath(path)) as im:
                return im.size
    except Exception:  # pylint: disable=broad-except  # unreadable, or a decompression bomb: the reader reports it
        return None


def read_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] of any image file, or ImageError with the reason (see module doc).

    16-bit images are scaled by their bit depth (65535), float images read as
    they are (values outside [0, 1] are refused), EXIF orientation applied,
    alpha flattened over white. ``max_side``: refuse larger images.
    """
    a = _read(path, [], max_side=max_side)
    h, w = a.shape[:2]
    out = np.empty((h, w, 3), np.float32)
    step = max(1, (1 << 18) // max(1, w))  # blocks of rows: no full-size temporary besides `out`
    for r in range(0, h, step):
        block = a[r:r + step].astype(np.float32)
        if a.dtype == np.uint8:
            block /= 255.0
        out[r:r + step] = _over_white(block) if a.shape[-1] == 4 else block
    return out


def load_rgb(path: str, events: list, min_side: int = 1, draft_hw: tuple[int, int] | None = None) -> np.ndarray | None:
    """uint8 [H, W, 3], or None (with a 'skipped' event naming the reason) when unusable.

    Background images with alpha are flattened over white (how a viewer shows them).
    """
    try:
        a = _read(path, events, draft_hw)
    except ImageError as e:
        events.append(("skipped", e.code, path))
        return None
    if a.shape[-1] == 4:
        events.append(("converted", "rgba", path))
        a = _over_white(a)
    a = _to_uint8(a)
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
        a = _to_uint8(_read(path, events))
    except ImageError as e:
        events.append(("skipped", e.code, path))
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
