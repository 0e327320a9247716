"""The AlphaBlend synthesizer: one (composite, background, foreground, caption)
sample per (task, split, index), deterministic for a seed.

A sample is made in three steps: draw a background (user folder, bundled
photos, or a procedural scan / microscopy field) and a foreground (user RGBA
folder or the task's procedural generator); round both to uint8, exactly as
they are stored; composite the *stored* layers with the task's law and round
again. So every stored triple recomposes to its stored composite within
0.5/255 (the data-integrity property the tests check).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dd_jax.data import backgrounds as sources, blend, fg_layers, fg_objects, raster

GENERATORS = {
    "xray": fg_objects.xray,
    "glassware": fg_objects.glassware,
    "watermark": fg_layers.watermark,
    "cell": fg_objects.cell,
    "occlusion": fg_layers.occlusion,
    "flare": fg_layers.flare,
}
# style "photo": overlays at a photo's own pixel scale over near-native views
# of the photos, for models trained on native-resolution crops and run
# tile by tile (a watermark's 2 px stroke stays 2 px).
STYLES = ("classic", "photo")
PHOTO_GENERATORS = {
    **GENERATORS,
    "watermark": fg_layers.watermark_photo,
    "occlusion": lambda rng, h, w: fg_layers.occlusion(rng, h, w, scale=rng.uniform(0.3, 1.2)),
    "flare": lambda rng, h, w: fg_layers.flare(rng, h, w, scale=rng.uniform(0.3, 1.5)),
}
PHOTO_VIEW = (1.0, 1.5)  # photo pixels per output pixel in style "photo" (at most a 1.5x reduction)
SPLIT_CODE = {"train": 0, "test": 1, "validation": 2}
MAX_ATTEMPTS = 5


@dataclasses.dataclass
class Sample:
    composite: np.ndarray  # uint8 [H, W, 3]
    background: np.ndarray  # uint8 [H, W, 3]
    foreground: np.ndarray  # uint8 [H, W, 4], straight alpha
    caption: str
    task: str
    events: list  # (kind, reason, path) about odd user files met on the way
    attempts: int = 1

    def as_example(self) -> dict:
        return {"composite": self.composite, "background": self.background,
                "foreground": self.foreground, "caption": self.caption, "task": self.task}


class Synthesizer:
    """Makes AlphaBlend samples of one task at one size.

    Args:
      task: one of ``blend.TASKS``.
      height, width: output size (any size; the paper uses 512x512 / 512x1024).
      backgrounds: a folder of the user's photos (default: bundled photos, or
        procedural scans for ``xray`` and microscopy fields for ``cell``).
      foregrounds: a folder of real RGBA layers (default: procedural).
      seed: the dataset seed; sample ``i`` of a split depends only on
        (seed, task, split, i), not on the order or process it is made in.
      min_side: user background images with a shorter side are skipped
        (default: half the output's shorter side, at least 32 px).
      style: ``classic`` or ``photo`` (`STYLES`).
      exclude_held_out: never use the bundled photos of the real-photo
        evaluation (``backgrounds.HELD_OUT_PHOTOS``); default: in style "photo".
    """

    def __init__(self, task: str, height: int = 512, width: int = 512, backgrounds: str | None = None,
                 foregrounds: str | None = None, seed: int = 0, min_side: int | None = None,
                 style: str = "classic", exclude_held_out: bool | None = None):
        if task not in blend.TASK_INDEX:
            raise ValueError(f"unknown task {task!r}; expected one of {blend.TASKS}")
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
        self.task, self.height, self.width, self.seed, self.style = task, int(height), int(width), int(seed), style
        min_side = min_side or max(32, min(self.height, self.width) // 2)
        view = PHOTO_VIEW if style == "photo" else None
        exclude_held_out = style == "photo" if exclude_held_out is None else exclude_held_out
        self.bg_source = sources.make_backgrounds(task, backgrounds, min_side, native=view,
                                                  exclude=sources.HELD_OUT_PHOTOS if exclude_held_out else ())
        self.fg_source = sources.FolderForegrounds(foregrounds, task) if foregrounds else None

    def reports(self) -> dict:
        """Header-scan reports of the user folders (for the build summary)."""
        out = {}
        for name, src in (("backgrounds", self.bg_source), ("foregrounds", self.fg_source)):
            if src is not None and hasattr(src, "report"):
                out[name] = src.report
        return out

    def rng(self, split: str, index: int, attempt: int = 0) -> np.random.Generator:
        key = [self.seed, blend.TASK_INDEX[self.task], SPLIT_CODE.get(split, 3), int(index), attempt]
        return np.random.default_rng(key)

    def _draw(self, rng, events):
        h, w = self.height, self.width
        bg, bg_desc = self.bg_source.sample(rng, h, w, events)
        if self.task == "flare" and isinstance(self.bg_source, sources.PackageBackgrounds) \
                and rng.random() < 0.5:
            bg = bg ** rng.uniform(1.3, 2.2) * rng.uniform(0.5, 0.9)  # dusk / night look
        if self.fg_source is not None:
            fg, fg_desc = self.fg_source.sample(rng, h, w, events)
        else:
            fg, fg_desc = (PHOTO_GENERATORS if self.style == "photo" else GENERATORS)[self.task](rng, h, w)
        return bg, bg_desc, fg, fg_desc

    def sample(self, index: int, split: str = "train") -> Sample:
        """Sample ``index`` of ``split``. A generator failure (e.g. a broken
        user file) is retried with a fresh draw, up to ``MAX_ATTEMPTS`` times."""
        events: list = []
        err = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                bg, bg_desc, fg, fg_desc = self._draw(self.rng(split, index, attempt), events)
                break
            except Exception as e:  # pylint: disable=broad-except
                err = e
        else:
            raise RuntimeError(f"sample {split}/{index} failed {MAX_ATTEMPTS} times") from err
        bg8 = raster.to_uint8(bg)
        fg8 = blend.quantize_rgba(fg)
        comp = blend.composite(self.task, fg8.astype(np.float32) / 255.0, bg8.astype(np.float32) / 255.0)
        return Sample(raster.to_uint8(comp), bg8, fg8, blend.caption(fg_desc, bg_desc), self.task,
                      events, attempt + 1)

