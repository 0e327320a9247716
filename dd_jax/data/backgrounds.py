"""Background and foreground *sources* for the synthesizer.

* ``FolderBackgrounds``: the user's photos (any format ``images.py`` reads).
* ``PackageBackgrounds``: the real photographs that ship inside scikit-image
  and scikit-learn (offline), with hand-written descriptions.
* ``ProceduralBackgrounds``: X-ray baggage scans / microscopy fields.
* ``FolderForegrounds``: real RGBA layers (watermark PNGs, glass cut-outs,
  Flare7K-style flares on black, ...).

Every source has ``sample(rng, h, w, events) -> (float32 image, description)``;
images are random views (crop with the target aspect, resize, flip, colour
jitter) so a few source images still give varied samples. ``events``
collects (kind, reason, path) tuples about odd files for the build summary.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from dd_jax.data import blend, fg_objects, images

# name -> (loader, description, weight); grey photos are drawn less often
_PACKAGE = {
    "astronaut": ("skimage", "a portrait of an astronaut in an orange suit in front of a flag", 1.0),
    "coffee": ("skimage", "a cup of espresso on a red saucer on a wooden table", 1.0),
    "chelsea": ("skimage", "a close-up of a tabby cat", 1.0),
    "rocket": ("skimage", "a rocket on a launch pad under a blue sky", 1.0),
    "hubble_deep_field": ("skimage", "a deep-space image full of distant galaxies", 0.6),
    "immunohistochemistry": ("skimage", "a stained tissue section under a microscope", 0.6),
    "retina": ("skimage", "a photograph of the retina of a human eye", 0.5),
    "stereo_motorcycle": ("skimage", "a motorcycle parked in a room", 1.0),
    "camera": ("skimage", "a black-and-white photo of a cameraman with a tripod", 0.3),
    "moon": ("skimage", "a grey photo of the surface of the moon", 0.2),
    "brick": ("skimage", "a grey brick wall", 0.2),
    "grass": ("skimage", "a grey photo of grass", 0.2),
    "gravel": ("skimage", "a grey photo of gravel", 0.2),
    "coins": ("skimage", "old coins on a dark background", 0.2),
    "china.jpg": ("sklearn", "a Chinese temple among green trees", 1.0),
    "flower.jpg": ("sklearn", "a close-up of a pink flower", 1.0),
}


# Bundled photos that "photo"-style training data never uses: the real-photo
# evaluation (scripts/eval_photos.py) decomposes them at their own size.
HELD_OUT_PHOTOS = ("stereo_motorcycle", "rocket", "china.jpg")


@functools.cache
def package_image(name: str) -> np.ndarray | None:
    """uint8 RGB of one bundled photo, or None if this install lacks it."""
    src = _PACKAGE[name][0]
    try:
        if src == "skimage":
            import skimage.data  # pylint: disable=g-import-not-at-top

            a = getattr(skimage.data, name)()
            if isinstance(a, tuple):
                a = a[0]
        else:
            from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top

            a = load_sample_image(name)
    except Exception:  # pylint: disable=broad-except  # e.g. a file needing a download
        return None
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def random_view(img: np.ndarray, rng: np.random.Generator, h: int, w: int,
                jitter: bool = True, min_scale: float = 0.45,
                native: tuple[float, float] | None = None) -> np.ndarray:
    """A random crop with aspect h:w, resized to (h, w), maybe flipped and jittered.

    ``img`` is uint8 [H, W, C]; returns float32 in [0, 1] with C channels.
    ``native=(lo, hi)``: the crop holds lo-hi photo pixels per output pixel
    (near the photo's own scale) instead of a ``min_scale``-1 share of it.
    """
    ih, iw = img.shape[:2]
    full = min(ih, iw * h / w)
    if native is not None:
        ch = min(full, h * rng.uniform(*native))
    else:
        ch = full * rng.uniform(min_scale, 1.0)
    cw = ch * w / h
    y0, x0 = rng.uniform(0, ih - ch), rng.uniform(0, iw - cw)
    im = Image.fromarray(img)
    if img.shape[-1] == 4:
        im = im.convert("RGBa")  # resample premultiplied, no dark fringes
    resample = Image.BICUBIC if ch < h else Image.LANCZOS
    im = im.resize((w, h), resample, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)
    if img.shape[-1] == 4:
        im = im.convert("RGBA")
    out = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if jitter:
        rgb = out[..., :3]
        gain = rng.uniform(0.8, 1.2) * rng.uniform(0.95, 1.05, 3)
        mean = rgb.mean()
        rgb = (rgb - mean) * rng.uniform(0.8, 1.2) + mean
        grey = rgb.mean(-1, keepdims=True)
        rgb = grey + (rgb - grey) * rng.uniform(0.7, 1.3)
        out = np.concatenate([np.clip(rgb * gain, 0, 1), out[..., 3:]], -1)
    return np.ascontiguousarray(out, dtype=np.float32)


class PackageBackgrounds:
    """Photos bundled with scikit-image / scikit-learn (no network needed)."""

    def __init__(self, native: tuple[float, float] | None = None, exclude: tuple[str, ...] = ()):
        self.native = native
        self.names = [n for n in _PACKAGE if n not in exclude and package_image(n) is not None]
        if not self.names:
            raise RuntimeError("no bundled scikit-image / scikit-learn photos found")
        wts = np.array([_PACKAGE[n][2] for n in self.names])
        self.p = wts / wts.sum()

    def sample(self, rng: np.random.Generator, h: int, w: int, events: list) -> tuple[np.ndarray, str]:
        del events
        name = self.names[int(rng.choice(len(self.names), p=self.p))]
        return random_view(package_image(name), rng, h, w, native=self.native), _PACKAGE[name][1]


class ProceduralBackgrounds:
    """Structured backgrounds: ``xray_bag`` scans or ``microscopy`` fields."""

    def __init__(self, fn: Callable[[np.random.Generator, int, int], tuple[np.ndarray, str]]):
        self.fn = fn

    def sample(self, rng: np.random.Generator, h: int, w: int, events: list) -> tuple[np.ndarray, str]:
        del events
        return self.fn(rng, h, w)


class SourceError(ValueError):
    """A user folder that cannot give a single sample; the text names the folder and what was wrong."""


_REASONS = {"corrupt": "corrupt or unreadable", "tiny": "tiny (shorter side under {min_side} px)",
            "no_alpha": "no_alpha (no alpha channel; this task's layers need one)",
            "empty_alpha": "empty_alpha (fully transparent)", "float_range": "float_range (float values outside "
            "[0, 1])", "int_range": "int_range (integer values outside their bit depth)",
            "unreadable": "unreadable (permission denied)", "missing": "missing"}


class _Folder:
    """Shared logic: a header-scanned file list and a retrying random pick."""

    MAX_TRIES = 32

    def __init__(self, folder: str, min_side: int):
        self.report = images.FolderReport()
        self.min_side = min_side
        if not os.path.isdir(folder):
            raise SourceError(f"{folder}: not a folder")
        self.paths = images.scan(folder, min_side, self.report)
        self._check(folder)

    def _check(self, folder: str) -> None:
        """Raises SourceError unless one file really decodes as a usable image (a header scan passes
        truncated files, and foregrounds without alpha), naming what was wrong with the others."""
        if not self.report.files:
            raise SourceError(f"{folder}: no image files ({', '.join(sorted(images.IMAGE_EXTS))}, searched "
                              "recursively); point it at a folder of images")
        rejected = {reason: len(paths) for reason, paths in self.report.skipped.items()}
        for path in self.paths:
            events: list = []
            if self.load(path, events) is not None:
                return
            for kind, reason, _ in events:
                if kind == "skipped":
                    rejected[reason] = rejected.get(reason, 0) + 1
        what = ", ".join(f"{n} {_REASONS.get(r, r).format(min_side=self.min_side)}"
                         for r, n in sorted(rejected.items()))
        raise SourceError(f"{folder}: no usable image among {self.report.files} image file(s): {what}; "
                          "add usable images or choose another folder")

    def load(self, path: str, events: list) -> np.ndarray | None:
        raise NotImplementedError

    def _pick(self, rng, events, load):
        # The draws depend only on rng and the files, so a sample is the same
        # in any worker process whatever that process has seen before.
        for _ in range(self.MAX_TRIES):
            path = self.paths[int(rng.integers(len(self.paths)))]
            a = load(path, events)
            if a is not None:
                return path, a
        raise RuntimeError(f"{self.MAX_TRIES} unreadable files in a row in {self.report.folder!r}")


class FolderBackgrounds(_Folder):
    """The user's photos; ``<stem>.txt`` beside an image is its description."""

    def __init__(self, folder: str, min_side: int, native: tuple[float, float] | None = None):
        self.native = native
        super().__init__(folder, min_side)

    def load(self, path: str, events: list, draft_hw: tuple[int, int] | None = None) -> np.ndarray | None:
        return images.load_rgb(path, events, self.min_side, draft_hw=draft_hw)

    def sample(self, rng: np.random.Generator, h: int, w: int, events: list) -> tuple[np.ndarray, str]:
        path, a = self._pick(rng, events, lambda p, ev: self.load(p, ev, None if self.native else (h, w)))
        desc = images.sidecar_caption(path) or "a natural photograph"
        return random_view(a, rng, h, w, native=self.native), desc


_FULL_FRAME = ("occlusion", "flare")


class FolderForegrounds(_Folder):
    """Real RGBA layers for one task, placed like the procedural ones.

    Full-frame tasks (occlusion, flare) take a random view covering the
    image; object tasks scale the layer into the image at a random place
    (watermarks to the appendix's 96-128 px at 512, opacity 0.12-0.25).
    """

    def __init__(self, folder: str, task: str, min_side: int = 16):
        self.task = task
        super().__init__(folder, min_side)

    def load(self, path: str, events: list) -> np.ndarray | None:
        return images.load_rgba(path, events, self.min_side, emission=self.task in ("flare", "cell"))

    def sample(self, rng: np.random.Generator, h: int, w: int, events: list) -> tuple[np.ndarray, str]:
        path, a = self._pick(rng, events, self.load)
        desc = images.sidecar_caption(path) or blend.FOREGROUND_DESCRIPTIONS[self.task]
        if self.task in _FULL_FRAME:
            return random_view(a, rng, h, w, jitter=False, min_scale=0.6), desc
        s = min(h, w) / 512.0
        ah, aw = a.shape[:2]
        if self.task == "watermark":
            side = rng.uniform(96, 128) * s
        else:
            side = rng.uniform(0.3, 0.85) * min(h, w)
        k = min(side / max(ah, aw), h / ah, w / aw)
        nh, nw = max(1, int(round(ah * k))), max(1, int(round(aw * k)))
        im = Image.fromarray(a).convert("RGBa").resize((nw, nh), Image.LANCZOS).convert("RGBA")
        lay = np.asarray(im, np.float32) / 255.0
        if rng.random() < 0.5 and self.task != "watermark":
            lay = lay[:, ::-1]
        out = np.zeros((h, w, 4), np.float32)
        y0, x0 = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
        out[y0:y0 + nh, x0:x0 + nw] = lay
        if self.task == "watermark":
            out[..., 3] *= rng.uniform(0.12, 0.25)
        return out, desc


def make_backgrounds(task: str, folder: str | None = None, min_side: int = 64,
                     native: tuple[float, float] | None = None,
                     exclude: tuple[str, ...] = ()) -> FolderBackgrounds | ProceduralBackgrounds | PackageBackgrounds:
    """The default background source of a task (a user folder wins); ``native``: see `random_view`;
    ``exclude``: bundled photos not to use."""
    if folder:
        return FolderBackgrounds(folder, min_side, native)
    if task == "xray":
        return ProceduralBackgrounds(fg_objects.xray_bag)
    if task == "cell":
        return ProceduralBackgrounds(fg_objects.microscopy)
    return PackageBackgrounds(native, exclude)

