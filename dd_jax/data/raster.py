"""Small, fast raster primitives for the procedural layer generators.

Everything returns float32 arrays in [0, 1] (masks [H, W], images [H, W, C]).
Drawing goes through PIL (C code, antialiased by 2x supersampling); blurs and
noise through scipy / PIL resampling, so one 512x512 layer costs milliseconds.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

SS = 2  # supersampling factor for antialiased shapes


# ------------------------------------------------------------------ filters
def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes (large sigmas via a pyramid)."""
    if sigma <= 0.3:
        return x.astype(np.float32, copy=False)
    x = x.astype(np.float32, copy=False)
    h, w = x.shape[:2]
    k = int(sigma // 4)
    if k >= 2 and min(h, w) // k >= 8:
        small = _resize(x, (max(1, h // k), max(1, w // k)), Image.BOX)
        small = blur(small, sigma / k)
        return _resize(small, (h, w), Image.BILINEAR)
    s = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, s, mode="nearest", truncate=3.0)


def _resize(x: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    h, w = hw
    if x.ndim == 2:
        return np.asarray(Image.fromarray(x, "F").resize((w, h), resample))
    return np.stack([_resize(x[..., c], hw, resample) for c in range(x.shape[-1])], -1)


def resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a float array [H, W] or [H, W, C]."""
    return np.clip(_resize(x.astype(np.float32, copy=False), hw, Image.BICUBIC), 0, None)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float,
                 octaves: int = 4, persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise, normalized to [0, 1]; ``cell`` is the coarsest scale in px."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        grid = rng.random((gh, gw), dtype=np.float32)
        out += amp * _resize(grid, (h, w), Image.BICUBIC)
        total += amp
        amp *= persistence
        cell = max(cell / 2.0, 1.0)
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def radial(h: int, w: int, cy: float, cx: float, sy: float = 1.0, sx: float = 1.0,
           angle: float = 0.0) -> np.ndarray:
    """Elliptic radius field around (cy, cx); 1 at distance (sy, sx)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / sx) ** 2 + (v / sy) ** 2)


# ------------------------------------------------------------------ drawing
class Canvas:
    """A supersampled greyscale canvas; ``.mask()`` returns the [H, W] float."""

    def __init__(self, h: int, w: int, ss: int = SS):
        self.h, self.w, self.ss = h, w, ss
        self.im = Image.new("L", (w * ss, h * ss), 0)
        self.draw = ImageDraw.Draw(self.im)

    def _p(self, pts):
        return [(float(x) * self.ss, float(y) * self.ss) for x, y in pts]

    def polygon(self, pts: Sequence[tuple[float, float]], value: float = 1.0) -> Canvas:
        self.draw.polygon(self._p(pts), fill=int(round(value * 255)))
        return self

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: float = 1.0, width: float = 0) -> Canvas:
        box = self._p([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        v = int(round(value * 255))
        if width:
            self.draw.ellipse(box, outline=v, width=max(1, int(width * self.ss)))
        else:
            self.draw.ellipse(box, fill=v)
        return self

    def line(self, pts: Sequence[tuple[float, float]], width: float, value: float = 1.0) -> Canvas:
        self.draw.line(self._p(pts), fill=int(round(value * 255)),
                       width=max(1, int(round(width * self.ss))), joint="curve")
        return self

    def text(self, xy: tuple[float, float], text: str, font: Font, value: float = 1.0, anchor: str = "mm",
             stroke: float = 0) -> Canvas:
        v = int(round(value * 255))
        self.draw.text(self._p([xy])[0], text, fill=v, font=font.at(self.ss), anchor=anchor,
                       stroke_width=int(stroke * self.ss), stroke_fill=v)
        return self

    def mask(self) -> np.ndarray:
        im = self.im.reduce(self.ss) if self.ss > 1 else self.im
        return np.asarray(im, np.float32) / 255.0


def rotate(x: np.ndarray, angle_deg: float, center: tuple[float, float] | None = None) -> np.ndarray:
    """Rotate a float array about ``center`` (x, y), keeping its size."""
    if x.ndim == 3:
        return np.stack([rotate(x[..., c], angle_deg, center) for c in range(x.shape[-1])], -1)
    im = Image.fromarray(x.astype(np.float32), "F")
    return np.asarray(im.rotate(angle_deg, Image.BILINEAR, center=center), np.float32)


def profile_polygon(cx: float, top: float, height: float,
                    radius: Sequence[float]) -> list[tuple[float, float]]:
    """A vertically symmetric silhouette from radii sampled top to bottom."""
    n = len(radius)
    ys = [top + height * i / (n - 1) for i in range(n)]
    right = [(cx + r, y) for r, y in zip(radius, ys)]
    left = [(cx - r, y) for r, y in zip(radius, ys)][::-1]
    return right + left


def wobbly_ellipse(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                   wobble: float = 0.1, n: int = 48) -> list[tuple[float, float]]:
    """An irregular closed outline (cells, blobs): radius with low harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += wobble / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


# ------------------------------------------------------------------ fonts
@functools.cache
def font_paths() -> tuple[str, ...]:
    """TrueType fonts found on this machine (sorted; may be empty)."""
    pats = ["/usr/share/fonts/**/*.ttf", "/usr/local/share/fonts/**/*.ttf",
            os.path.expanduser("~/.fonts/**/*.ttf"), "/Library/Fonts/*.ttf",
            "C:/Windows/Fonts/*.ttf"]
    found = set()
    for p in pats:
        found.update(glob.glob(p, recursive=True))
    found = [f for f in found if "math" not in os.path.basename(f).lower()]
    return tuple(sorted(found))


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int):
    if not path:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    return ImageFont.truetype(path, size)


class Font:
    """A font face and a size in output pixels (drawn larger on supersampled canvases)."""

    def __init__(self, path: str, size: float):
        self.path, self.size = path, max(6.0, float(size))

    def at(self, scale: int = 1) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        return _font(self.path, int(round(self.size * scale)))

    def getlength(self, text: str) -> float:
        return float(self.at(1).getlength(text))


# Faces never drawn into training data, so evaluation can use overlay styles
# the model has not seen (matched on the file name).
HELD_OUT_FONTS = ("SerifCondensed", "MathTeXGyre")


def training_fonts() -> tuple[str, ...]:
    """`font_paths()` without the held-out faces ("" = Pillow's own font)."""
    return ("",) + tuple(p for p in font_paths() if not any(k in os.path.basename(p) for k in HELD_OUT_FONTS))


def held_out_fonts() -> tuple[str, ...]:
    """The held-out faces found on this machine (may be empty)."""
    return tuple(p for p in font_paths() if any(k in os.path.basename(p) for k in HELD_OUT_FONTS))


def random_font(rng: np.random.Generator, size: float) -> Font:
    """A random TrueType font of ``size`` px (Pillow's own font as fallback)."""
    paths = ("",) + font_paths()
    return Font(paths[int(rng.integers(len(paths)))], size)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ layers
def layer(alpha: np.ndarray, colour: Sequence[float] | np.ndarray) -> np.ndarray:
    """An RGBA layer of one colour (or a colour image [H, W, 3]) and an alpha map."""
    alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    rgb = np.broadcast_to(np.asarray(colour, np.float32), alpha.shape + (3,))
    return np.concatenate([rgb, alpha[..., None]], -1)


def over(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Porter-Duff "over" of two straight RGBA layers."""
    at, ab = top[..., 3:], bottom[..., 3:]
    a = at + ab * (1.0 - at)
    rgb = top[..., :3] * at + bottom[..., :3] * ab * (1.0 - at)
    rgb = np.where(a > 1e-6, rgb / np.maximum(a, 1e-6), 0.0)
    return np.concatenate([np.clip(rgb, 0, 1), np.clip(a, 0, 1)], -1).astype(np.float32)


def stack(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Layers bottom to top, composited with ``over``."""
    out = layers[0]
    for lay in layers[1:]:
        out = over(lay, out)
    return out
