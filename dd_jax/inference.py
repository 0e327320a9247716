"""The one inference path of `decompose` and `evaluate`: images of any size -> layers at that size.

Two modes, both feeding the model fixed-shape batches of its working size
(config data.height x data.width), so one compilation serves a whole folder
of mixed sizes (the last batch is padded by repeating its last tile):

* ``tile`` (native resolution): the image is cut into overlapping tiles of
  the working size, at most `stride` = tile - overlap apart and spread so the
  last one ends on the border (images smaller than a tile are first padded
  by reflection, centred). Every tile is decomposed; the background is
  blended back as composite + change (the change of each tile weighted by a
  separable raised-cosine ramp over the overlap, then normalised by the
  summed weights), the foreground rendering with the same weights. Where two
  tiles overlap their two ramps sum to one, and a ramp only runs where a
  neighbour tile is, so a pointwise model comes out exactly as untiled.
* ``resize``: the whole image is resized to the working size, and the
  predicted change (background - composite) upsampled and added to the
  full-size composite (detail transfer; without it the background is
  resized). This suits models trained on whole images shrunk to their working
  size, and Flux runs that work at 512 and more.

`default_mode(config)`: ``tile`` when the config's `sample.tile` is true.
Tiles of several images share batches; results come back per image as soon
as its last tile is done (`decompose_stream`), so memory follows the largest
image in flight, not the folder.

`choose_task` picks a blend law for an image without one (see its doc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import checkpoints, hostmem, optional, system as system_lib
from dd_jax.data import blend

if TYPE_CHECKING:
    import ml_collections

MODES = ("tile", "resize")
# Overlap of neighbouring tiles as a fraction of the tile side (16 px for 64x64 tiles), measured in
# docs/decompose.md: a 1024x768 photo is 336 tiles of 64 at overlap 16, 475 at 24.
OVERLAP_FRACTION = 0.25


def default_overlap(tile: tuple[int, int]) -> int:
    return int(min(tile) * OVERLAP_FRACTION)


@dataclasses.dataclass
class Layers:
    """Decomposition of one image, float32 [H, W, 3] in [0, 1] at the input's size."""

    composite: np.ndarray  # the input
    background: np.ndarray
    foreground: np.ndarray | None  # the foreground layer rendered alone (blend.foreground_alone); None: no x target


def default_mode(config: ml_collections.ConfigDict) -> str:
    # saved configs from before the field existed get base's sample.tile, False: they were all resize-mode models
    return "tile" if config.sample.tile else "resize"


def check_options(system: system_lib.System, mode: str, *, mode_given: bool = True, overlap: int | None = None,
                  detail_transfer: bool = True, prompt: str | None = None, guidance: float | None = None) -> None:
    """ValueError (one line) for an option the run would ignore: `overlap` outside tile mode, no detail transfer
    outside resize mode, a `prompt` for a model conditioned on the task (not on text), a `guidance` for a model
    without a guidance input. `mode`: the run's; `mode_given`: by the user (else the model's default)."""
    how = f"this run decomposes in {mode} mode" + ("" if mode_given else " (the model's default, sample.tile)")
    if overlap is not None and mode != "tile":
        raise ValueError(f"--overlap {overlap} applies to --mode tile only; {how}: drop --overlap, or pass --mode "
                         f"tile")
    if not detail_transfer and mode != "resize":
        raise ValueError(f"--no-detail-transfer applies to --mode resize only; {how}: drop it, or pass --mode "
                         f"resize")
    if prompt is not None and system.model.conditioner is not None:
        raise ValueError(f"--prompt: this model is conditioned on the task (text.kind "
                         f"{system.config.text.kind!r}), not on a text prompt, so it would be ignored; drop --prompt")
    if guidance is not None and not system.model.transformer.params.guidance_embed:
        raise ValueError(f"--guidance {guidance:g}: this model has no guidance input (not guidance-distilled: "
                         f"guidance_embed is false), so it would be ignored; drop --guidance")


def working_size(system: system_lib.System) -> tuple[int, int]:
    return int(system.config.data.height), int(system.config.data.width)


# Rows of a full-size image processed at a time (resize, tile blending, the layers decompose writes): about this
# many pixels, so temporaries follow the block, not the image (docs/decompose.md, memory per input pixel).
BLOCK_PIXELS = 1 << 18


def row_blocks(height: int, width: int, pixels: int = BLOCK_PIXELS) -> Iterator[slice]:
    """Slices of [0, height) of about `pixels` / `width` rows each."""
    step = max(1, pixels // max(1, width))
    for r in range(0, height, step):
        yield slice(r, min(height, r + step))


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of `jax.image.resize(..., "linear", antialias=True)` along one axis (its
    `compute_weight_mat`, transposed): a triangle kernel widened by the downscale factor, rows normalised."""
    f32 = np.float32
    if n_in == n_out:
        return np.eye(n_in, dtype=f32)
    inv_scale = 1.0 / (n_out / n_in)
    kernel_scale = f32(max(inv_scale, 1.0))
    sample = (np.arange(n_out, dtype=f32) + f32(0.5)) * f32(inv_scale) - f32(0.5)
    x = np.abs(sample[:, None] - np.arange(n_in, dtype=f32)[None, :]) / kernel_scale
    weights = np.maximum(f32(0), f32(1) - x)
    total = weights.sum(1, keepdims=True)
    weights = np.where(np.abs(total) > 1000.0 * np.finfo(f32).eps, weights / np.where(total != 0, total, 1), 0)
    inside = (sample >= -0.5) & (sample <= n_in - 0.5)
    return np.where(inside[:, None], weights, 0).astype(f32)


def resize(img: np.ndarray, h: int, w: int, out: np.ndarray | None = None,
           add: np.ndarray | None = None) -> np.ndarray:
    """Linear resize with antialiasing of an [H, W, C] float image, as `jax.image.resize(img, (h, w, C),
    "linear", antialias=True)` (to float32 rounding), computed on the host in blocks of rows: besides the
    output no full-size array is made, however large the input or the output. `add` ([h, w, C]) is added to
    the result and `out` ([h, w, C] float32, may be `add` itself) receives it."""
    H, W, C = img.shape
    if (H, W) == (h, w) and add is None and out is None:
        return img
    out = np.empty((h, w, C), np.float32) if out is None else out

    def across(a: np.ndarray) -> np.ndarray:  # the columns of rows `a` [r, W, C] -> [r, w, C]
        a = np.asarray(a, np.float32)
        return a if W == w else np.einsum("xX,rXc->rxc", wx, a)

    wx = resize_matrix(W, w) if W != w else None
    if h <= H:  # rows kept or shrunk: blocks of input rows summed into the [h, W, C] rows, then their columns
        if h == H:
            rows = img
        else:
            wy, rows = resize_matrix(H, h), np.zeros((h, W, C), np.float32)
            for r in row_blocks(H, W):
                rows += np.tensordot(wy[:, r], np.asarray(img[r], np.float32), axes=(1, 0))
        for r in row_blocks(h, w):
            out[r] = across(rows[r]) if add is None else across(rows[r]) + add[r]
        return out
    wy, cols = resize_matrix(H, h), across(img)  # rows grow: the [H, w, C] columns first (as small as the input)
    for r in row_blocks(h, w):
        block = np.tensordot(wy[r], cols, axes=(1, 0))
        out[r] = block if add is None else block + add[r]
    return out


# ------------------------------------------------------------------ tiling geometry
def positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, length) (length >= tile): at most `stride` apart, the last ending at `length`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp_window(tile: int, left: int, right: int) -> np.ndarray:
    """1-D weights of a tile whose first `left` and last `right` pixels overlap a neighbour.

    Raised cosine over each overlap, 1 elsewhere: two overlapping ramps of the
    same length sum to exactly one, and the weight never reaches zero.
    """
    w = np.ones(tile, np.float64)
    if left > 0:
        w[:left] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(left) + 0.5) / left)
    if right > 0:
        w[tile - right:] = np.minimum(w[tile - right:],
                                      0.5 - 0.5 * np.cos(np.pi * (np.arange(right)[::-1] + 0.5) / right))
    return w


def axis_tiles(length: int, tile: int, stride: int) -> list[tuple[int, np.ndarray]]:
    """(start, 1-D weights) of the tiles along one axis."""
    starts = positions(length, tile, stride)
    out = []
    for i, s in enumerate(starts):
        left = starts[i - 1] + tile - s if i > 0 else 0
        right = s + tile - starts[i + 1] if i + 1 < len(starts) else 0
        out.append((s, ramp_window(tile, left, right)))
    return out


def reflect_pad(img: np.ndarray, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pads [H, W, C] by reflection (centred) to at least h x w; returns it and the (top, left) offset."""
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if not ph and not pw:
        return img, (0, 0)
    top, left = ph // 2, pw // 2
    return np.pad(img, ((top, ph - top), (left, pw - left), (0, 0)), mode="reflect"), (top, left)


def tile_count(height: int, width: int, tile: tuple[int, int], overlap: int | None = None) -> int:
    th, tw = tile
    overlap = default_overlap(tile) if overlap is None else overlap
    return (len(positions(max(height, th), th, max(1, th - overlap)))
            * len(positions(max(width, tw), tw, max(1, tw - overlap))))


# ------------------------------------------------------------------ jobs: one image, its tiles, its accumulators
class _TileJob:
    """An image's tiles and the float32 sums they are blended into. The weights are separable (a product of the
    two axes' ramps), so their sum is too: it is never stored at full size."""

    def __init__(self, image: np.ndarray, tile: tuple[int, int], overlap: int, has_fg: bool):
        th, tw = tile
        if not 0 <= overlap < min(th, tw):
            raise ValueError(f"tile overlap {overlap} must be in [0, {min(th, tw)})")
        self.image = image
        self.src, self.offset = reflect_pad(image, th, tw)
        ph, pw = self.src.shape[:2]
        ys = axis_tiles(ph, th, th - overlap)
        xs = axis_tiles(pw, tw, tw - overlap)
        self.slots = [(y, x, wy, wx) for y, wy in ys for x, wx in xs]
        self.weight_y, self.weight_x = np.zeros(ph), np.zeros(pw)  # the summed weights, per axis
        for y, wy in ys:
            self.weight_y[y:y + th] += wy
        for x, wx in xs:
            self.weight_x[x:x + tw] += wx
        self.tile = tile
        self.change = np.zeros((ph, pw, 3), np.float32)
        self.fg = np.zeros((ph, pw, 3), np.float32) if has_fg else None
        self.total, self.done = len(self.slots), 0

    def tiles(self) -> Iterator[tuple[int, np.ndarray]]:
        th, tw = self.tile
        for i, (y, x, _, _) in enumerate(self.slots):
            yield i, self.src[y:y + th, x:x + tw]

    def add(self, slot: int, bg: np.ndarray, fg: np.ndarray | None) -> None:
        th, tw = self.tile
        y, x, wy, wx = self.slots[slot]
        w = (wy[:, None] * wx[None, :])[..., None]
        self.change[y:y + th, x:x + tw] += w * (bg - self.src[y:y + th, x:x + tw])
        if self.fg is not None:
            self.fg[y:y + th, x:x + tw] += w * fg
        self.done += 1

    def result(self) -> Layers:
        """The layers at the image's size, made in place of the sums (blocks of rows: no full-size temporary)."""
        h, w = self.image.shape[:2]
        top, left = self.offset
        weight_x = self.weight_x[left:left + w, None]
        bg = self.change[top:top + h, left:left + w]
        fg = None if self.fg is None else self.fg[top:top + h, left:left + w]
        for r in row_blocks(h, w):
            weight = self.weight_y[top:top + h][r, None, None] * weight_x
            bg[r] = np.clip(self.image[r] + bg[r] / weight, 0, 1)
            if fg is not None:
                fg[r] = np.clip(fg[r] / weight, 0, 1)
        if (top, left) != (0, 0):  # padded (an image smaller than a tile): small, copied out of the padding
            bg, fg = np.ascontiguousarray(bg), None if fg is None else np.ascontiguousarray(fg)
        self.change = self.fg = None
        return Layers(self.image, bg, fg)


class _ResizeJob:
    def __init__(self, image: np.ndarray, tile: tuple[int, int], detail_transfer: bool):
        self.image, self.detail_transfer = image, detail_transfer
        self.src = resize(image, *tile).astype(np.float32)
        self.total, self.done = 1, 0
        self.out = None

    def tiles(self) -> Iterator[tuple[int, np.ndarray]]:
        yield 0, self.src

    def add(self, slot: int, bg: np.ndarray, fg: np.ndarray | None) -> None:
        self.out, self.done = (bg, fg), 1

    def result(self) -> Layers:
        """The layers at the image's size: each one full-size float32 array, made in blocks of rows."""
        h, w = self.image.shape[:2]
        bg, fg = self.out
        if self.detail_transfer:  # the input plus the upsampled change
            bg_full = resize(bg - self.src, h, w, add=self.image)
        else:
            bg_full = resize(bg, h, w)
        fg_full = None if fg is None else resize(fg, h, w)
        for r in row_blocks(h, w):
            np.clip(bg_full[r], 0, 1, out=bg_full[r])
            if fg_full is not None:
                np.clip(fg_full[r], 0, 1, out=fg_full[r])
        return Layers(self.image, bg_full, fg_full)


# ------------------------------------------------------------------ batches
class NonFiniteOutput(ValueError):
    """The model returned NaN or inf values: no layers are made from them (they would be written black)."""


def batch_key(key: jax.Array, index: int) -> jax.Array:
    """The sampling key of the `index`-th batch of one call: `key` itself for the first."""
    return key if index == 0 else jax.random.fold_in(key, index)


def run_batch(system: system_lib.System, tiles: np.ndarray, tasks: np.ndarray, key: jax.Array, *, steps: int,
              batch_size: int, guidance: float | None = None,
              prompt: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decomposes n <= batch_size tiles [n, h, w, 3] in [0, 1] padded to `batch_size` -> (bg, fg or None) [n, ...]."""
    n = len(tiles)
    if n < batch_size:  # fixed shape: one compilation
        tiles = np.concatenate([tiles, np.repeat(tiles[-1:], batch_size - n, 0)])
        tasks = np.concatenate([tasks, np.repeat(tasks[-1:], batch_size - n)])
    extra = None
    if system.model.conditioner is None:  # T5/CLIP conditioning: the prompts' embeddings
        txt, vec = system.prompt_conditioning(tasks, prompt)
        extra = {"txt": txt, "vec": vec}
    layers = system_lib.decompose(system, jnp.asarray(tiles * 2 - 1, jnp.float32), jnp.asarray(tasks, jnp.int32),
                                  key, steps, guidance, extra)
    out = {k: np.asarray(v, np.float32)[:n] for k, v in layers.items()}
    finite = {k: np.isfinite(v).reshape(n, -1).all(1) for k, v in out.items()}  # per tile
    if not all(f.all() for f in finite.values()):
        bad = [k for k, f in finite.items() if not f.all()]
        tiles = int((~np.logical_and.reduce(list(finite.values()))).sum())
        raise NonFiniteOutput(f"the model returned NaN or inf values (layer {', '.join(bad)}) for {tiles} of {n} "
                              f"tile(s); no layers are made from them (they would be black): check the model and "
                              f"its compute dtype ({system.config.model.compute_dtype or 'as the parameters'})")
    out = {k: np.clip((v + 1) / 2, 0, 1) for k, v in out.items()}
    hostmem.trim_if_grown()
    return out["y"], out.get("x")


def decompose_stream(system: system_lib.System, items: Iterable[tuple[Any, np.ndarray, str | int]], *, steps: int,
                     key: jax.Array, mode: str | None = None, batch_size: int = 16, overlap: int | None = None,
                     guidance: float | None = None, prompt: str | None = None, detail_transfer: bool = True,
                     progress: Callable[[Any, int, int], None] | None = None) -> Iterator[tuple[Any, Layers]]:
    """Decomposes `items` (tag, image [H, W, 3] float in [0, 1], task name or index); yields (tag, Layers).

    `overlap` (tile mode): pixels shared by neighbouring tiles (default `default_overlap`).

    Tiles of consecutive images share fixed-size batches; batch j samples
    with `batch_key(key, j)`. `progress(tag, tiles done, tiles total)` is
    called after every batch for each image it touched.
    """
    mode = mode or default_mode(system.config)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    tile = working_size(system)
    overlap = default_overlap(tile) if overlap is None else overlap
    has_fg = "x" in system.spec.targets
    queue: list[tuple[Any, Any, int, np.ndarray, int]] = []  # (tag, job, slot, tile, task)
    n_batches = 0

    def flush():
        nonlocal n_batches
        tiles = np.stack([q[3] for q in queue])
        tasks = np.array([q[4] for q in queue], np.int32)
        bg, fg = run_batch(system, tiles, tasks, batch_key(key, n_batches), steps=steps, batch_size=batch_size,
                           guidance=guidance, prompt=prompt)
        n_batches += 1
        touched = {}
        for i, (tag, job, slot, _, _) in enumerate(queue):
            job.add(slot, bg[i], None if fg is None else fg[i])
            touched[id(job)] = (tag, job)
        queue.clear()
        for tag, job in touched.values():
            if progress:
                progress(tag, job.done, job.total)
            if job.done == job.total:
                yield tag, job.result()

    for tag, image, task in items:
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[2] != 3 or not image.size:
            raise ValueError(f"{tag}: expected an [H, W, 3] image, got shape {image.shape}")
        t = blend.TASK_INDEX[task] if isinstance(task, str) else int(task)
        job = (_TileJob(image, tile, overlap, has_fg) if mode == "tile"
               else _ResizeJob(image, tile, detail_transfer))
        for slot, tl in job.tiles():
            queue.append((tag, job, slot, tl, t))
            if len(queue) == batch_size:
                yield from flush()
    if queue:
        yield from flush()


def decompose_images(system: system_lib.System, images: list[np.ndarray], tasks: list[str | int],
                     **kw: Any) -> list[Layers]:
    """`decompose_stream` over a list, results in order."""
    out = dict(decompose_stream(system, ((i, im, t) for i, (im, t) in enumerate(zip(images, tasks))), **kw))
    return [out[i] for i in range(len(images))]


# ------------------------------------------------------------------ choosing the task of an image
# Why these features: the identity decomposition (background = composite, empty foreground) recomposes perfectly
# under every law, so recomposition error alone cannot pick a task; and models answer some task conditionings
# with large changes whatever the image (the shipped model changes most images a lot under xray and cell, and
# almost nothing under watermark). What tells the image's task apart is how large the change is and how well the
# layers recompose *relative to what that conditioning usually does*: a per-task calibration of the two features
# (`TaskHead`, fitted on a built split with `python -m dd_jax.inference`). Without a fitted head, the
# uncalibrated score change - 4 x recomposition error is used (measured in docs/decompose.md).
TASK_FEATURES = ("change", "recompose")
TASK_HEAD_FILE = "task_head.json"
UNCALIBRATED_RECOMPOSE_WEIGHT = 4.0
PROBE_TILES = 3  # native-resolution probe tiles besides the whole image at working size


def probe_tiles(image: np.ndarray, tile: tuple[int, int], native: int = PROBE_TILES) -> list[np.ndarray]:
    """Working-size views of an image: the whole image resized, plus up to `native` native-resolution tiles."""
    th, tw = tile
    src, _ = reflect_pad(image, th, tw)
    h, w = src.shape[:2]
    if (h, w) == (th, tw):
        return [src]
    probes = [resize(image, th, tw).astype(np.float32)]
    ys, xs = positions(h, th, th), positions(w, tw, tw)
    for f in np.linspace(0, 1, native + 2)[1:-1][:native]:
        y, x = ys[round(f * (len(ys) - 1))], xs[round(f * (len(xs) - 1))]
        probes.append(src[y:y + th, x:x + tw])
    return probes


def task_features(system: system_lib.System, images: list[np.ndarray], *, steps: int, key: jax.Array,
                  batch_size: int = 16, guidance: float | None = None, prompt: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """[N, len(blend.TASKS), len(TASK_FEATURES)]: log RMSE of the change and of the recomposition, per task.

    Every image's probes (`probe_tiles`) are decomposed under each task; the
    values are means over the probes. `progress(probes done, probes in all)`
    is called as they are done (after every batch).
    """
    tile = working_size(system)
    probes = [probe_tiles(im, tile) for im in images]
    items = [((i, t, p), pr, t) for i, prs in enumerate(probes) for t in blend.TASKS for p, pr in enumerate(prs)]
    sums = np.zeros((len(images), len(blend.TASKS), len(TASK_FEATURES)))
    done = 0
    for (i, t, _p), out in decompose_stream(system, items, steps=steps, key=key, mode="tile", batch_size=batch_size,
                                           guidance=guidance, prompt=prompt):
        done += 1  # a probe is one tile: it comes back with the batch that held it
        if progress:
            progress(done, len(items))
        comp, bg = out.composite, out.background
        change = float(np.sqrt(np.mean((bg - comp) ** 2)))
        rec = blend.recompose_error(t, out.foreground, comp, bg) if out.foreground is not None else change
        sums[i, blend.TASK_INDEX[t]] += np.log(np.array([change, rec]) + 1e-3)
    return sums / np.array([len(p) for p in probes], np.float64)[:, None, None]


@dataclasses.dataclass
class TaskHead:
    """Per-task calibration of the task features: score_t = w_t . (f_t - mean_t) / std_t + b_t."""

    mean: np.ndarray  # [tasks, features]
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray  # [tasks]
    note: str = ""

    def scores(self, features: np.ndarray) -> np.ndarray:
        return (((features - self.mean) / self.std) * self.weights).sum(-1) + self.bias

    def to_json(self) -> dict:
        return {"tasks": list(blend.TASKS), "features": list(TASK_FEATURES), "note": self.note,
                **{k: np.asarray(getattr(self, k)).round(6).tolist() for k in ("mean", "std", "weights", "bias")}}

    @classmethod
    def from_json(cls, d: dict) -> TaskHead:
        if tuple(d.get("tasks", ())) != blend.TASKS or tuple(d.get("features", ())) != TASK_FEATURES:
            raise ValueError(f"task head for tasks {d.get('tasks')} / features {d.get('features')}: expected "
                             f"{list(blend.TASKS)} / {list(TASK_FEATURES)}")
        return cls(*(np.asarray(d[k], np.float64) for k in ("mean", "std", "weights", "bias")), d.get("note", ""))


def fit_task_head(features: np.ndarray, labels: np.ndarray, l2: float = 1e-2, iters: int = 3000,
                  note: str = "") -> TaskHead:
    """Multinomial logistic regression of the task on its own features (per-task weights), L2-regularised."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    n, k, f = features.shape
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    w, b = np.zeros((k, f)), np.zeros(k)
    for _ in range(iters):
        s = (z * w).sum(-1) + b
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(n), labels] -= 1
        p /= n
        w -= 0.5 * ((p[..., None] * z).sum(0) + l2 * w)
        b -= 0.5 * p.sum(0)
    return TaskHead(mean, std, w, b, note)


def load_task_head(model_path: str | None) -> TaskHead | None:
    """The fitted head beside a model (its folder or a workdir's export/), else None."""
    if not model_path:
        return None
    for p in (os.path.join(model_path, TASK_HEAD_FILE), os.path.join(model_path, "export", TASK_HEAD_FILE)):
        if os.path.isfile(p):
            with open(p) as f:
                return TaskHead.from_json(json.load(f))
    return None


def task_scores(features: np.ndarray, head: TaskHead | None) -> np.ndarray:
    """[..., tasks] scores from `task_features`: the head's, else change - 4 x recomposition error."""
    if head is not None:
        return head.scores(features)
    lin = np.exp(features) - 1e-3
    return lin[..., 0] - UNCALIBRATED_RECOMPOSE_WEIGHT * lin[..., 1]


def choose_task(system: system_lib.System, image: np.ndarray, *, steps: int, key: jax.Array, batch_size: int = 16,
                guidance: float | None = None, prompt: str | None = None, head: TaskHead | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[str, dict[str, float]]:
    """The task whose decomposition of `image` scores best (`task_scores`); returns it and every task's score.
    `progress(probes done, probes in all)`: see `task_features`."""
    feats = task_features(system, [image], steps=steps, key=key, batch_size=batch_size, guidance=guidance,
                          prompt=prompt, progress=progress)[0]
    s = task_scores(feats, head)
    return blend.TASKS[int(np.argmax(s))], {t: float(v) for t, v in zip(blend.TASKS, s)}


def _fit_main(argv=None) -> int:
    """`python -m dd_jax.inference (--data DIR | --procedural N) [--checkpoint MODEL]`: fit the task head, write
    MODEL/task_head.json."""
    ap = argparse.ArgumentParser(prog="python -m dd_jax.inference", description=_fit_main.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="built AlphaBlend data (python -m dd_jax.data.build), all six tasks")
    src.add_argument("--procedural", type=int, metavar="N",
                     help="fit on N synthesized images per task (dd_jax.data.procedural, its test stream; no build "
                          "step), and report the accuracy on N more from its validation stream")
    ap.add_argument("--size", type=int, default=128, help="--procedural: image size (default 128)")
    ap.add_argument("--style", default="classic+photo", help="--procedural: synthesizer style(s) (classic+photo)")
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N examples per task")
    ap.add_argument("--eval-data", default=None, help="another built split: report the head's accuracy on it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing task_head.json")
    args = ap.parse_args(argv)
    if args.procedural is not None and (args.procedural < 1 or args.size < 16):
        ap.error("--procedural N needs N >= 1 and --size >= 16")
    if args.data is not None:
        try:  # built data is read through Grain's pipeline from TFDS files; decomposition needs neither
            for module in ("grain", "tensorflow_datasets"):
                optional.require(module, "python -m dd_jax.inference --data")
        except optional.MissingPackage as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    path = args.checkpoint or checkpoints.DEFAULT_MODEL
    dest = os.path.join(path, TASK_HEAD_FILE)
    if os.path.exists(dest) and not args.overwrite:
        print(f"error: {dest} exists (--overwrite replaces it)", file=sys.stderr)
        return 2
    system = checkpoints.load_trained(path)
    steps = system.config.sample.steps

    def collect(data, split=args.split):
        images, labels = [], []
        for t in blend.TASKS:
            if args.procedural is not None:
                from dd_jax.data import procedural  # pylint: disable=g-import-not-at-top

                source = procedural.ProceduralSource([t], args.size, args.size, seed=args.seed, split=split,
                                                     style=args.style)
                images += [source[i]["composite"].astype(np.float32) / 255.0 for i in range(args.procedural)]
                labels += [blend.TASK_INDEX[t]] * args.procedural
                continue
            from dd_jax.data import pipeline  # pylint: disable=g-import-not-at-top

            ex = pipeline.Examples(data, t, split, args.limit)
            images += [ex[i]["composite"] for i in range(len(ex))]
            labels += [blend.TASK_INDEX[t]] * len(ex)
        print(f"{data}: {len(images)} images", file=sys.stderr)
        return task_features(system, images, steps=steps, key=jax.random.key(args.seed),
                             batch_size=args.batch_size), np.array(labels)

    if args.procedural is not None:
        name = f"procedural {args.style} {args.size}px, seed {args.seed}"
        feats, labels = collect(name, "test")
        head = fit_task_head(feats, labels, note=f"fitted on {name} (test stream, {len(labels)} images)")
        evaluation = [("eval data (validation stream)", collect(name, "validation"))]
    else:
        feats, labels = collect(args.data)
        head = fit_task_head(feats, labels, note=f"fitted on {args.data} ({args.split}, {len(labels)} images)")
        evaluation = [("eval data", collect(args.eval_data))] if args.eval_data else []
    for name, (f, y) in [("fit data", (feats, labels))] + evaluation:
        for label, h in (("head", head), ("uncalibrated", None)):
            pred = np.argmax(task_scores(f, h), -1)
            conf = np.zeros((len(blend.TASKS),) * 2, int)
            np.add.at(conf, (y, pred), 1)
            print(f"{name}, {label}: accuracy {np.trace(conf) / len(y):.3f}; rows truth, columns chosen "
                  f"({', '.join(blend.TASKS)}):\n{conf}", file=sys.stderr)
    with open(dest, "w") as fh:
        json.dump(head.to_json(), fh, indent=1)
    print(f"wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_fit_main())
