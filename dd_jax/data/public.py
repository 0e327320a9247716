"""Shared parts of the public-benchmark builders (``clwd``, ``flare7k``).

The user supplies each benchmark's folder as published; nothing is
downloaded. A split is a set of sibling folders holding one file per example,
paired by name: the file's stem, less a folder-specific prefix (Flare7K++
names its files ``input_000000.png``, ``gt_000000.png``, ``mask_000000.png``),
whatever the extension (``1.jpg`` pairs with ``1.png``). Folders that do not
hold the same names are refused (``SourceError``, one line) before anything is
written.

Records have the ``alphablend`` features plus ``mask`` (the benchmark's own
evaluation mask, PNG). The metadata stores the source folder: ``build``
refuses to reuse a dataset built from another one.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dd_jax.data import alphablend, blend, images


class SourceError(ValueError):
    """A benchmark folder that cannot be built; the text (one line) says which path and why."""


def _natural_key(key: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key) if t]


def index_folder(folder: str, prefix: str = "") -> dict[str, str]:
    """{name key: path} of the images in `folder` (not recursive); the key is the stem less `prefix`."""
    out: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if f.startswith(".") or ext.lower() not in images.IMAGE_EXTS:
            continue
        key = stem[len(prefix):] if prefix and stem.startswith(prefix) else stem
        if key in out:
            raise SourceError(f"{folder}: two files for {key!r} ({os.path.basename(out[key])}, {f}); keep one")
        out[key] = os.path.join(folder, f)
    return out


def pair(root: str, folders: dict[str, str], what: str) -> list[tuple[str, dict[str, str]]]:
    """[(key, {folder: path})] over the names every folder holds, in natural order.

    `folders` maps each sub-folder of `root` to its file prefix. Raises
    SourceError for a missing folder, an empty one, or folders whose names differ."""
    index = {}
    for sub, prefix in folders.items():
        path = os.path.join(root, sub)
        if not os.path.isdir(path):
            raise SourceError(f"{what}: no folder {sub}/ in {root} (expected {', '.join(folders)})")
        index[sub] = index_folder(path, prefix)
    first = next(iter(folders))
    keys = set(index[first])
    if not keys:
        raise SourceError(f"{what}: no image in {os.path.join(root, first)}")
    for sub in folders:
        other = set(index[sub])
        if other != keys:
            lack, extra = sorted(keys - other, key=_natural_key), sorted(other - keys, key=_natural_key)
            parts = ([f"lacks {len(lack)} of {first}'s names (e.g. {', '.join(lack[:3])})"] if lack else []) + \
                    ([f"has {len(extra)} names {first} lacks (e.g. {', '.join(extra[:3])})"] if extra else [])
            raise SourceError(f"{what}: {os.path.join(root, sub)} {' and '.join(parts)}; the folders must hold "
                              "the same images, paired by name: fix or remove the odd files")
    return [(k, {sub: index[sub][k] for sub in folders}) for k in sorted(keys, key=_natural_key)]


def load_gray(path: str, events: list) -> np.ndarray | None:
    """uint8 [H, W] (a colour file is converted to luma), or None with a 'skipped' event."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.uint8)
    except Exception:  # pylint: disable=broad-except
        events.append(("skipped", "unreadable", path))
        return None


def fit(a: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    """`a` resized to (h, w) when it differs (bicubic; nearest for label masks)."""
    if a.shape[:2] == (h, w):
        return a
    return np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST if nearest else Image.BICUBIC))


def features(mask_channels: int) -> tfds.features.FeaturesDict:
    """``alphablend.layer_features`` plus the benchmark's evaluation ``mask``."""
    return tfds.features.FeaturesDict({
        "composite": tfds.features.Image(shape=(None, None, 3)),
        "background": tfds.features.Image(shape=(None, None, 3)),
        "foreground": tfds.features.Image(shape=(None, None, 4)),
        "mask": tfds.features.Image(shape=(None, None, mask_channels)),
        "caption": tfds.features.Text(),
        "task": tfds.features.ClassLabel(names=list(blend.TASKS)),
    })


def stored_source(version_dir: str) -> str | None:
    """The source folder a built benchmark stored in its metadata.json, or None."""
    try:
        with open(os.path.join(version_dir, "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta.get("source") if isinstance(meta, dict) else None


class PairedBuilder(alphablend._Builder):  # pylint: disable=protected-access
    """Base of the benchmark builders: `splits()` -> {split: pairs}; `read(paths, events)` -> example."""

    MASK_CHANNELS = 1
    HOMEPAGE = ""

    def __init__(self, *, source: str | None = None, **kwargs):
        self.source = os.path.abspath(source) if source else None
        self.summary = {"examples": {}, "skipped": collections.Counter()}
        self._pairs = None
        super().__init__(**kwargs)

    def parameters(self) -> dict:
        return {"source": self.source}

    # subclasses
    def find_splits(self, source: str) -> dict[str, list]:
        raise NotImplementedError

    def read(self, paths: dict[str, str], events: list) -> dict | None:
        raise NotImplementedError

    def check_source(self) -> dict[str, list]:
        """Pairs the files of every split (SourceError when the tree is malformed); before anything is written."""
        if self._pairs is None:
            if not self.source:
                raise SourceError(f"{self.name}: no source folder given")
            self._pairs = self.find_splits(self.source)
        return self._pairs

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__class__.__doc__, features=features(self.MASK_CHANNELS),
            metadata=tfds.core.MetadataDict(source=self.source, summary=self.summary), homepage=self.HOMEPAGE)

    def _split_generators(self, dl_manager):
        if self.source is None:
            self.source = os.path.abspath(os.fspath(dl_manager.manual_dir))
        return {split: self._generate_examples(split, pairs) for split, pairs in self.check_source().items()}

    def _generate_examples(self, split: str, pairs):
        reads = ((key, lambda events, paths=paths: self.read(paths, events)) for key, paths in pairs)
        return alphablend.counted_examples(self, split, reads, f"{self.name}/{self.builder_config.name}: no "
                                           f"readable example in split {split!r} of {self.source}")
