"""TFDS builder ``flare7k``: the Flare7K++ test data (Dai et al., "Flare7K++:
Mixing Synthetic and Real Datasets for Nighttime Flare Removal and Beyond",
2023; Flare7K, NeurIPS 2022) from a folder the user supplies.

Layout (``manual_dir`` may be ``Flare7Kpp/``, its ``test_data/`` or the
config's own folder)::

    test_data/real/  (config real)   test_data/synthetic/  (config synthetic)
      input/input_000000.png   the flare-corrupted photo   -> composite
      gt/gt_000000.png         the flare-free photo        -> background
      mask/mask_000000.png     the region mask, by colour  -> mask [H, W, 3]

Files pair by name less the folder's prefix (``input_``, ``gt_``,
``mask_``), whatever the extension. Only a test split. The law is additive
light (``flare``, in linear light with gamma 2.2): the foreground is the
flare recovered from the pair, light = (max(input^g - gt^g, 0))^(1/g), so
that ``blend.composite('flare', fg, gt)`` gives back the input wherever it is
at least the gt (on the real pairs, captured photos, only approximately).
The mask's colours mark the evaluation regions (``metrics.protocols``).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dd_jax.data import alphablend, blend, images, public

CONFIGS = ("real", "synthetic")
FOLDERS = {"input": "input_", "gt": "gt_", "mask": "mask_"}


def find_root(manual_dir: str, config: str) -> str:
    for cand in (os.path.join(manual_dir, "test_data", config), os.path.join(manual_dir, config), manual_dir):
        if os.path.isdir(os.path.join(cand, "input")):
            return cand
    raise public.SourceError(f"no Flare7K++ {config} test data under {manual_dir} (expected "
                             f"test_data/{config}/ holding input/, gt/, mask/)")


def find_splits(manual_dir: str, config: str) -> dict[str, list]:
    root = find_root(manual_dir, config)
    return {"test": public.pair(root, FOLDERS, f"Flare7K++ {config}")}


def flare_layer(comp: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """uint8 RGBA flare layer with blend.composite('flare', layer, bg) == comp where comp >= bg."""
    f = lambda a: a.astype(np.float64) / 255.0  # noqa: E731
    light = blend.from_linear(np.maximum(blend.to_linear(f(comp)) - blend.to_linear(f(bg)), 0.0))
    return blend.quantize_rgba(blend.emission_to_rgba(light))


def read_example(paths: dict[str, str], events: list) -> dict | None:
    comp = images.load_rgb(paths["input"], events)
    bg = images.load_rgb(paths["gt"], events)
    try:
        with Image.open(paths["mask"]) as im:
            mask = np.asarray(im.convert("RGB"), np.uint8)
    except Exception:  # pylint: disable=broad-except
        events.append(("skipped", "unreadable", paths["mask"]))
        mask = None
    if comp is None or bg is None or mask is None:
        events.append(("skipped", "missing_or_unreadable", paths["input"]))
        return None
    h, w = comp.shape[:2]
    bg, mask = public.fit(bg, h, w), public.fit(mask, h, w, nearest=True)
    return {"composite": alphablend.png(comp), "background": alphablend.png(bg),
            "foreground": alphablend.png(flare_layer(comp, bg)), "mask": alphablend.png(mask),
            "caption": blend.caption("a lens flare", "a night photograph"), "task": "flare"}


class Flare7k(public.PairedBuilder):
    """Flare7K++ nighttime flare removal test data (real and synthetic)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"Flare7K++ test_data/{c}") for c in CONFIGS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the Flare7K++ folder (holding test_data/real and test_data/synthetic, "
                                    "from https://github.com/ykdai/Flare7K) in the manual dir.")
    MASK_CHANNELS = 3
    HOMEPAGE = "https://github.com/ykdai/Flare7K"

    def find_splits(self, source: str) -> dict[str, list]:
        return find_splits(source, self.builder_config.name)

    def read(self, paths: dict[str, str], events: list) -> dict | None:
        return read_example(paths, events)
