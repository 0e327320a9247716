"""The Grain input pipeline over built AlphaBlend / LOGO datasets, or procedural data drawn by index.

``make_pipeline(...)`` returns a ``grain.IterDataset``; ``iter(ds)`` gives a
``grain.DatasetIterator`` whose ``get_state()`` / ``set_state()`` checkpoint
it exactly (a restored iterator yields the batches an uninterrupted one
would). Each element goes through: random-access read (``tfds`` data source,
PNG decode) -> crop / resize to (height, width) -> foreground target
rendering -> scale to [-1, 1]. Batches are dicts of numpy arrays, NHWC:

  composite   float32 [B, H, W, 3] in [-1, 1]
  background  float32 [B, H, W, 3] in [-1, 1]
  foreground  float32 [B, H, W, 3] in [-1, 1]: ``blend.foreground_alone``,
              a 3-channel rendering for every task (the autoencoder's input);
              ``blend.recompose`` maps (foreground, background) back to the
              composite (with the alpha below for glassware / watermark /
              occlusion)
  foreground_rgba  float32 [B, H, W, 4] in [-1, 1] (only with include_rgba)
  caption     str  [B]     the paper's prompt
  task        int32 [B]    index into ``blend.TASKS`` (the blend law)
  task_name   str  [B]     ``blend.TASKS[task]``
  dataset     str  [B]     e.g. 'alphablend/xray', 'logo/high'
  key         int64 [B]    the record's index in the (unsharded) mixture
  txt         float32 [B, L, C]  T5 states of the caption, and
  vec         float32 [B, P]     CLIP pooled output: only with a text cache
              (``text_cache``, by default ``<data_dir>/text_cache`` when it
              exists; ``python -m dd_jax.data.encode_text``) or online
              encoding (``text_encoders``); see ``dd_jax.data.text_cache``

With ``source="procedural"`` the records are synthesized on access
(``dd_jax.data.procedural``) instead of read: nothing is built or stored,
and the same transform follows.

Determinism: a batch depends only on (datasets, seed, batch_size, shard,
worker_count). Sharding slices records before shuffling: shard i of n gets
records i, i+n, ... of the mixture, so shards are disjoint and cover it.
Several tasks are mixed either in proportion to their sizes (default: one
global shuffle, exact epochs) or with ``weights`` (infinite sampling).
Resizing, when the stored size differs, resamples the three stored images
independently (the composite stays the stored one); at the build size the
triple is exactly the stored one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from dd_jax.data import blend, procedural, text_cache as tc

# ----------------------------------------------------------------- sources
# TFDS imports the module named by every "pythonClassName" in a dataset's features.json when it opens the
# dataset, so a crafted data dir could run code. Only the feature classes our builders write are accepted.
ALLOWED_FEATURES = frozenset(f"tensorflow_datasets.core.features.{c}" for c in (
    "features_dict.FeaturesDict", "image_feature.Image", "text_feature.Text", "class_label_feature.ClassLabel"))


def check_features(version_dir: str) -> None:
    """Raises ValueError (naming the file) unless ``features.json`` names only ``ALLOWED_FEATURES``.

    Run before TFDS reads the dataset: TFDS would import any module named there."""
    path = os.path.join(version_dir, "features.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); rebuild the dataset with python -m dd_jax.data.build") from e
    names, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pythonClassName":
                    names.add(value if isinstance(value, str) else repr(value))
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    other = sorted(names - ALLOWED_FEATURES)
    if other or not names:
        raise ValueError(f"{path} names feature classes our builders never write ({', '.join(other) or 'none'}); "
                         "TFDS would import them, running their code: refused. Rebuild the dataset with "
                         "python -m dd_jax.data.build")


def _versions(path: str) -> list[str]:
    """Complete version directories (``1.0.0``) of a dataset, oldest first. TFDS builds into
    ``incomplete.*`` and renames at the end; a build killed after it wrote ``dataset_info.json`` but
    before the rename leaves one holding that file, which is not a dataset to read."""
    if not os.path.isdir(path):
        return []
    out = [os.path.join(path, v) for v in os.listdir(path)
           if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isfile(os.path.join(path, v, "dataset_info.json"))]
    return sorted(out, key=lambda p: [int(x) for x in os.path.basename(p).split(".")])


BENCHMARKS = ("logo", "clwd", "flare7k")  # built from user-supplied folders: DIR/<benchmark>/<config>/<version>


def find_dataset_dir(data_dir: str, task: str) -> tuple[str, str]:
    """(version directory, dataset name) of ``task`` under a build ``--out`` dir.

    ``task`` is a subtask name, a benchmark (``logo``, ``clwd``, ``flare7k``: its
    first config present) or ``<benchmark>/<config>`` (``logo/high``, ``flare7k/real``);
    ``data_dir`` may also be a version directory itself. The directory's
    ``features.json`` is checked (``check_features``) before TFDS can read it.
    """
    found = _find_dataset_dir(data_dir, task)
    check_features(found[0])
    return found


def _find_dataset_dir(data_dir: str, task: str) -> tuple[str, str]:
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        parts = os.path.normpath(data_dir).split(os.sep)
        return data_dir, "/".join(parts[-3:-1])
    bench = task.split("/", 1)[0]
    if bench in BENCHMARKS:
        configs = [task.split("/", 1)[1]] if "/" in task else sorted(os.listdir(os.path.join(data_dir, bench))) \
            if os.path.isdir(os.path.join(data_dir, bench)) else []
        for cfg in configs:
            found = _versions(os.path.join(data_dir, bench, cfg))
            if found:
                return found[-1], f"{bench}/{cfg}"
    else:
        found = _versions(os.path.join(data_dir, "alphablend", task))
        if found:
            return found[-1], f"alphablend/{task}"
    raise FileNotFoundError(f"no complete dataset for {task!r} under {data_dir!r}")


def open_source(data_dir: str, task: str, split: str) -> tuple[Any, str]:
    """A random-access ``tfds`` data source and its dataset name."""
    import tensorflow_datasets as tfds  # TensorFlow is slow to import: only when a dataset is opened

    path, name = find_dataset_dir(data_dir, task)
    return tfds.builder_from_directory(path).as_data_source(split=split), name


class MultiSource:
    """Random access over several sources, one after the other (picklable)."""

    def __init__(self, sources: Sequence, names: Sequence[str]):
        self.sources, self.names = list(sources), list(names)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        rec = dict(self.sources[k][index - int(self.offsets[k])])
        rec["dataset"] = self.names[k]
        rec["key"] = index
        return rec

    def __repr__(self) -> str:
        return f"MultiSource({self.names}, n={len(self)})"


# ----------------------------------------------------------------- transform
CROPS = ("resize", "native")


def _fit(img: np.ndarray, h: int, w: int, y0f: float, x0f: float, crop: str = "resize") -> np.ndarray:
    """Resize to cover (h, w) keeping the aspect, then crop at fractional offsets.

    `crop="native"` keeps the record's own pixels when it covers (h, w): a
    window of it, never resized (native-resolution training)."""
    ih, iw = img.shape[:2]
    if crop == "native" and ih >= h and iw >= w:
        y0, x0 = int(round(y0f * (ih - h))), int(round(x0f * (iw - w)))
        return img[y0:y0 + h, x0:x0 + w]
    if (ih, iw) != (h, w):
        scale = max(h / ih, w / iw)
        nh, nw = max(h, int(np.ceil(ih * scale - 1e-6))), max(w, int(np.ceil(iw * scale - 1e-6)))
        if (nh, nw) != (ih, iw):
            im = Image.fromarray(img)
            if img.shape[-1] == 4:
                im = im.convert("RGBa")
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
            img = np.asarray(im.convert("RGBA") if img.shape[-1] == 4 else im)
        y0 = int(round(y0f * (img.shape[0] - h)))
        x0 = int(round(x0f * (img.shape[1] - w)))
        img = img[y0:y0 + h, x0:x0 + w]
    return img


class Prepare(grain.transforms.RandomMap):
    """Decoded record -> training example (crop / resize, targets, [-1, 1])."""

    def __init__(self, height: int, width: int, random_crop: bool, include_rgba: bool = False,
                 crop: str = "resize"):
        if crop not in CROPS:
            raise ValueError(f"crop {crop!r}; choose from {CROPS}")
        self.height, self.width, self.crop = int(height), int(width), crop
        self.random_crop, self.include_rgba = bool(random_crop), bool(include_rgba)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        h, w = self.height, self.width
        y0f, x0f = (rng.random(), rng.random()) if self.random_crop else (0.5, 0.5)
        comp, bg, fg = (_fit(np.asarray(element[k]), h, w, y0f, x0f, self.crop)
                        for k in ("composite", "background", "foreground"))
        task = int(element["task"])
        name = blend.TASKS[task]
        inv = np.float32(2.0 / 255.0)
        fg01 = fg.astype(np.float32) / 255.0
        out = {
            "composite": comp.astype(np.float32) * inv - 1.0,
            "background": bg.astype(np.float32) * inv - 1.0,
            "foreground": blend.foreground_alone(name, fg01) * 2.0 - 1.0,
            "caption": _text(element["caption"]),
            "task": np.int32(task),
            "task_name": name,
            "dataset": element.get("dataset", ""),
            "key": np.int64(element.get("key", -1)),
        }
        if self.include_rgba:
            out["foreground_rgba"] = fg01 * 2.0 - 1.0
        return out


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class AttachText(grain.transforms.Map):
    """Adds the cached T5 states (``txt``) and CLIP pooled output (``vec``) of the example's caption."""

    def __init__(self, cache: tc.TextCache):
        self.cache = cache

    def map(self, element: dict) -> dict:
        element["txt"], element["vec"] = self.cache[element["caption"]]
        return element


class EncodeText(grain.transforms.Map):
    """Online alternative to the cache: encodes a batch's captions with T5 + CLIP (memoized per caption)."""

    def __init__(self, encoder: tc.TextEncoder):
        self.encoder = encoder

    def map(self, batch: dict) -> dict:
        batch["txt"], batch["vec"] = self.encoder.encode(list(batch["caption"]))
        return batch


class _Tag(grain.transforms.MapWithIndex):
    """Names the record of a per-task source (weighted mixtures): dataset
    name and the key the record has in the size-proportional mixture.

    Past the first epoch of a repeated source the index keeps growing (Grain
    passes epoch * size + i), so it is taken modulo the shard's size."""

    def __init__(self, name: str, offset: int, shard_index: int, shard_count: int, size: int):
        self.name, self.offset = name, int(offset)
        self.shard_index, self.shard_count, self.size = int(shard_index), int(shard_count), int(size)

    def map_with_index(self, index: int, element: dict) -> dict:
        element = dict(element)
        element["dataset"] = self.name
        element["key"] = self.offset + self.shard_index + (int(index) % self.size) * self.shard_count
        return element


# ----------------------------------------------------------------- pipeline
SOURCES = ("built", "procedural")


def resolve_tasks(data_dir: str, tasks: str | Iterable[str], source: str = "built") -> list[str]:
    """The task names of `tasks`; "all": every subtask (procedural) or every one built under `data_dir`."""
    if isinstance(tasks, str):
        if tasks == "all":
            if source == "procedural":
                return list(blend.TASKS)
            return [t for t in blend.TASKS if os.path.isdir(os.path.join(data_dir, "alphablend", t))]
        return [tasks]
    return list(tasks)


def make_pipeline(data_dir: str, tasks: str | Iterable[str], split: str = "train", height: int = 512, width: int = 512,
                  batch_size: int = 1, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  worker_count: int = 0, shard_index: int | None = None, shard_count: int | None = None,
                  weights: Sequence[float] | None = None, drop_remainder: bool | None = None,
                  random_crop: bool | None = None, include_rgba: bool = False, crop: str = "resize",
                  read_threads: int = 2,
                  prefetch_buffer_size: int = 16, worker_buffer_size: int = 2, text_cache: str | None = "auto",
                  text_encoders: str | None = None, source: str = "built", style: str = "classic",
                  examples: int = 0, text_quantize: str = "") -> grain.IterDataset:
    """The training / evaluation input pipeline (see the module docstring).

    Args:
      data_dir: the ``--out`` directory of ``dd_jax.data.build`` (or a version dir).
      tasks: a subtask name, ``logo`` / ``logo/<config>``, a list of them, or ``all``.
      split: ``train`` or ``test``.
      height, width: output size, multiples of 16 (e.g. 512x512, 512x1024).
      batch_size: per-process batch size.
      seed: shuffling / cropping seed.
      shuffle: shuffle records (a fresh permutation per epoch).
      num_epochs: ``None`` repeats forever.
      worker_count: Grain worker processes (0: in-process).
      shard_index, shard_count: this process' shard (default: JAX process index / count).
      weights: mixing weights per task (infinite sampling); default: mix by size.
      drop_remainder: drop a last partial batch (default: when repeating forever).
      random_crop: random (train) or centred crops when resizing (default: ``shuffle``).
      include_rgba: also yield ``foreground_rgba``.
      crop: ``resize`` (scale each record to cover the output, then crop) or
        ``native`` (a window of the record's own pixels when it is at least
        the output size: native-resolution training on larger scenes).
      read_threads, prefetch_buffer_size: Grain read threads / element buffer
        (per process; keep them small on small machines).
      worker_buffer_size: batches buffered per worker process.
      text_cache: a text-embedding cache folder whose rows are attached to every
        example by caption (``txt``, ``vec``); ``"auto"``: ``<data_dir>/text_cache``
        if it exists; ``None``: no text embeddings. A caption missing from the
        cache is an error.
      text_encoders: encode captions online instead, with the converted T5 + CLIP
        of this folder (``scripts/convert_flux.py --output``); holds the encoders
        in the input pipeline's process.
      text_quantize: with ``text_encoders``: T5's weights quantized (``int8``,
        ``fp8``, ``int4``; ``dd_jax.quantize``), as the model's are.
      source: ``built`` (the data sets under ``data_dir``) or ``procedural``
        (examples synthesized by index, ``dd_jax.data.procedural``: no build, no
        disk; ``data_dir`` is not read, ``tasks`` ``all`` means every subtask,
        and ``num_epochs`` does not apply: the stream is endless, every record a
        fresh draw; ``shuffle`` applies only with ``examples``).
      style: the synthesizer's style for ``procedural`` (``synth.STYLES``).
      examples: ``procedural`` only: 0 (every record a fresh draw), or N: the
        first N records only, reshuffled every epoch (``shuffle``) and repeated
        forever (a fixed training set, e.g. to see a model fit it).
    """
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    if source not in SOURCES:
        raise ValueError(f"data source {source!r}; choose from {', '.join(SOURCES)}")
    tasks = resolve_tasks(data_dir, tasks, source)
    if not tasks:
        raise ValueError(f"no tasks found under {data_dir!r}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    shard = slice(shard_index, None, shard_count)
    if source == "procedural":
        if num_epochs is not None:
            raise ValueError("procedural data is an endless stream: num_epochs does not apply")
        ds = _procedural_records(tasks, split, height, width, seed, style, weights, examples, shuffle, shard)
        text_cache = None if text_cache == "auto" else text_cache  # captions vary: no cache of a data dir
    else:
        ds = _built_records(data_dir, tasks, split, seed, shuffle, num_epochs, weights, shard_index, shard_count)
    random_crop = shuffle if random_crop is None else random_crop
    ds = ds.random_map(Prepare(height, width, random_crop, include_rgba, crop), seed=seed + 1)
    cache, encoder = _text_source(data_dir, text_cache, text_encoders, text_quantize)
    if cache is not None:
        ds = ds.map(AttachText(cache))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch_buffer_size))
    drop = (num_epochs is None) if drop_remainder is None else drop_remainder
    it = it.batch(batch_size, drop_remainder=drop)
    if encoder is not None:
        it = it.map(EncodeText(encoder))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    return it


def _built_records(data_dir: str, tasks: list[str], split: str, seed: int, shuffle: bool, num_epochs: int | None,
                   weights: Sequence[float] | None, shard_index: int, shard_count: int) -> grain.MapDataset:
    """This shard's records of the built data sets: mixed by size (epochs) or by `weights` (endless)."""
    opened = [open_source(data_dir, t, split) for t in tasks]
    shard = slice(shard_index, None, shard_count)
    if weights is None:
        ds = grain.MapDataset.source(MultiSource([s for s, _ in opened], [n for _, n in opened]))[shard]
        if shuffle:
            ds = ds.shuffle(seed=seed)
        return ds.repeat(num_epochs) if num_epochs != 1 else ds
    if num_epochs is not None:
        raise ValueError("weighted mixing samples forever: use num_epochs=None")
    if len(weights) != len(opened):
        raise ValueError("one weight per task")
    parts, offset = [], 0
    for k, (src, name) in enumerate(opened):
        p = grain.MapDataset.source(src)[shard]
        p = p.map_with_index(_Tag(name, offset, shard_index, shard_count, len(p)))
        parts.append((p.shuffle(seed=seed + 7919 * (k + 1)) if shuffle else p).repeat(None))
        offset += len(src)
    return grain.MapDataset.mix(parts, weights=list(weights))


def _procedural_records(tasks: list[str], split: str, height: int, width: int, seed: int, style: str,
                        weights: Sequence[float] | None, examples: int, shuffle: bool,
                        shard: slice) -> grain.MapDataset:
    """This shard's synthesized records: an endless stream of fresh draws, or the first `examples` of it
    repeated (reshuffled every epoch with `shuffle`)."""
    if examples < 0:
        raise ValueError(f"examples={examples}: 0 (endless) or a number of records")
    ds = grain.MapDataset.source(procedural.ProceduralSource(tasks, height, width, seed=seed, split=split,
                                                             style=style, weights=weights))
    if not examples:
        return ds[shard]
    ds = ds[:examples][shard]
    return (ds.shuffle(seed=seed) if shuffle else ds).repeat(None)


def _text_source(data_dir: str, cache: str | None, encoders: str | None, quantize: str = ""):
    """(TextCache or None, TextEncoder or None) for make_pipeline."""
    if encoders:
        if cache not in (None, "auto"):
            raise ValueError("give text_cache or text_encoders, not both")
        return None, tc.TextEncoder(encoders, quantize=quantize)
    if cache == "auto":
        auto = tc.default_cache_dir(data_dir)
        return (tc.TextCache(auto) if os.path.isfile(os.path.join(auto, tc.INDEX_FILE)) else None), None
    return (tc.TextCache(cache) if cache else None), None


def to_unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] back to [0, 1]."""
    return (np.asarray(x) + 1.0) * 0.5


# ----------------------------------------------------------------- examples (evaluation)
def dataset_metadata(version_dir: str) -> dict:
    """The build settings a dataset stored (seed, size, ...; AlphaBlend builds), or {}."""
    try:
        with open(os.path.join(version_dir, "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: meta[k] for k in ("seed", "height", "width", "backgrounds", "foregrounds") if k in meta}


class Examples:
    """The first `limit` examples of a split, read and prepared on access as [0, 1] arrays.

    `size` None: compare at the stored size (of the first record; others are fitted to it).
    """

    def __init__(self, data_dir: str, task: str, split: str, limit: int | None = None,
                 size: tuple[int, int] | None = None):
        self.source, self.dataset = open_source(data_dir, task, split)
        self.metadata = dataset_metadata(find_dataset_dir(data_dir, task)[0])
        self.n = len(self.source) if limit is None else min(limit, len(self.source))
        if size is None and self.n:
            size = tuple(np.asarray(self.source[0]["composite"]).shape[:2])
        self.size = size
        self.prepare = Prepare(size[0], size[1], random_crop=False, include_rgba=True) if self.n else None
        self.rng = np.random.default_rng(0)  # unused with centred crops

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rec = dict(self.source[i])
        ex = self.prepare.random_map(rec, self.rng)
        out = {"index": i, "task": int(ex["task"]),
               **{k: to_unit(ex[k]).astype(np.float32)
                  for k in ("composite", "background", "foreground", "foreground_rgba")}}
        if "mask" in rec:  # a benchmark's evaluation mask (CLWD, Flare7K++), fitted as the images are
            m = np.asarray(rec["mask"])
            m = _fit(m[..., 0] if m.shape[-1] == 1 else m, *self.size, 0.5, 0.5)
            out["mask"] = (m.reshape(*self.size, -1).astype(np.float32) / 255.0)
        return out
