"""Decompose images into layers: `python -m dd_jax.decompose --input FILES_OR_DIR --output DIR`.

For every input it writes, at the input's own size,
- `<stem>_background.png`: the scene without the overlay (RGB);
- `<stem>_foreground.png`: the overlay as a straight-alpha RGBA layer. Over
  the background it recomposes the input with the task's blend law: alpha-over
  (watermark, glassware, occlusion: alpha estimated from the input, the
  background and the model's rendering of the layer, so it follows the
  overlay's edges), added light (cell, flare: alpha = brightest channel) or
  X-ray transmittance (the layer over white is the item as scanned).
With `--format psd` (or `both`: the PNGs and the PSD) it writes `<stem>.psd`,
a layered 8-bit RGB Photoshop file at the input's size. Its layers, bottom to
top: `background` (Normal), then `foreground (<task>)` in the mode of the
task's law: Normal (watermark, occlusion: the RGBA foreground), Multiply
(xray: the RGBA foreground), Linear Dodge (Add) (cell: the light on black;
flare: the light the flare adds to this background, since flare adds in
linear light, which no PSD mode does). glassware (multiply on dark
backgrounds, screen on bright ones) is two layers, `foreground (glassware,
multiply)` under `foreground (glassware, screen)`, the RGBA foreground with
its alpha split by the background's luma. Composited (Photoshop, psd-tools)
they give back the input as the PNGs do, up to 8-bit rounding
(dd_jax.psd_layers).

Every decomposition reports its recomposition error: the RMSE (0-255) of the
input against the task's blend law applied to the written layers (8-bit
background and RGBA foreground). It is printed per image and written with
the inputs, tasks, outputs and settings to a JSON sidecar per run,
`decompose_<UTC time>.json` in the output folder (a new name every run).
With `--num-samples K > 1` the files are `<stem>_s<k>_background.png`, ...;
with `--select recompose` only the sample whose layers recompose best (lowest
recomposition RMSE; the K samples differ by their noise and go through the
model in the same fixed-shape batches) is kept, under the plain names, and
the sidecar lists every sample's error. Measured with the shipped model
(scripts/best_of_k.py, data/eval_photo64): it lowers the recomposition error
but not the background RMSE against the truth (K = 8 raises it for occlusion
and flare), so it is off by default.
With `--passes N > 1` (images with several overlays) pass 1 decomposes the
input, and pass p the background pass p - 1 wrote (8-bit): the outermost
overlay comes off first. Each pass's task is given (`--task
watermark,flare`: pass 1 first; one task: every pass) or chosen (the file
name for pass 1, else automatically, printed; `auto` in the list). It writes
`<stem>_foreground_1.png` ... `<stem>_foreground_N.png` (pass order) and the
last pass's `<stem>_background.png`; the input is law_1(fg_1, law_2(fg_2,
... background)), so the PSD's layers, bottom to top, are `background`,
`foreground N (<task>)`, ..., `foreground 1 (<task>)`. The sidecar lists
every pass (task, how chosen, its recomposition error); the image's error is
that of all the layers recomposed. Measured on two-overlay composites in
docs/decompose.md (scripts/two_overlays.py).
Inputs that share a stem get names that tell them apart: the extension is
added (`a/x.png`, `a/x.jpg` -> `x_png_...`, `x_jpg_...`), and the folder too
when the file names are the same (`a/x.jpg`, `b/x.jpg` -> `a_x_jpg_...`,
`b_x_jpg_...`). A stem whose output names would pass the file system's
limit (NAME_MAX bytes) is cut and `~<8 hex digits of its SHA-1>` appended
(`fit_stem`: the same names every run), announced, and mapped in the
sidecar; an output name the file system refuses skips that input (one
line, exit status 1) and the batch goes on.

Nothing is written over: if an output file exists the run stops before the
model runs, unless `--overwrite` is given (which replaces those outputs, never
an input). The output folder is checked first (not a file, not under a file,
writable), then locked for the run (`OUT/.dd_jax.lock`, `dd_jax.outdir`): a
second decompose or evaluate run on it stops at once with one line naming the
first's pid. An input's files are written under temporary names and moved in
together; without `--overwrite` by hard links, so a file another program made
meanwhile is kept (the run stops). A write that fails (a full disk) stops the
run with one line, its partial files removed and the files written before
kept. Ctrl-C keeps what was written (whole), writes its sidecar and says
how to finish: rerun the same command with `--skip-existing`, which leaves
alone the inputs whose outputs all exist (docs/decompose.md). Exit status:
0 all inputs done, 1 some inputs skipped (unreadable, or a name refused;
each is reported), 2 usage or input error (a `--config` of another
architecture than the model's, a model with NaN or inf parameters, or
outputs: refused, never written as black layers), or a write that failed,
130 interrupted.

Without `--checkpoint`, the small model shipped with the package is used
(dd_jax/assets/tiny, configs/tiny.py). The task (blend law) comes from
`--task`, else from the file name when it starts with a task name (e.g.
`watermark_01.png`), else it is chosen automatically and printed: every task
is tried on a downscaled copy and the one whose layers change the image most
while recomposing to it is kept (`dd_jax.inference.choose_task`).

Size (`dd_jax.inference`): `--mode tile` decomposes the image at its native
resolution in overlapping tiles of the model's working size, blended back
seamlessly; `--mode resize` decomposes the whole image resized to the working
size and adds the upsampled change to the full-size input. The default is the
model's (`sample.tile` in its config). Either way tiles go through the model
in fixed-shape batches (`--batch-size`, the last one padded), so a folder of
mixed sizes compiles once. Unreadable inputs are reported and skipped, and so
are, before they are decoded, inputs whose decomposition would take more memory
than is available (estimated from the size in their header: `check_size`,
docs/decompose.md) or, with `--max-pixels N`, that have more than N pixels.

Runs of a real Flux (configs/flux.py, T5/CLIP conditioning) take each task's
prompt (`dd_jax.data.blend.task_prompt`, or `--prompt`) from the run's
text cache, else encode it with the converted T5/CLIP of `text.encoders` /
`model.weights`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from dd_jax import (
    checkpoints,
    cli,
    config as config_lib,
    hostmem,
    inference,
    outdir,
    psd_layers,
    quantize as quantize_lib,
    system as system_lib,
)
from dd_jax.data import blend, images

IMAGE_EXTENSIONS = tuple(sorted(images.IMAGE_EXTS))  # what the reader reads (a folder's other files are not listed)
MAX_SIDE = 16384  # refuse larger inputs rather than running out of memory half-way
# Peak host memory of one input, bytes per input pixel, measured (peak RSS against the image size, flat PNGs of
# 1000^2-3000^2 px, the shipped model; docs/decompose.md): the float32 input and layers, the 8-bit layers written.
# An input whose estimate (`memory_estimate`) passes the memory available is refused before it is decoded.
BYTES_PER_PIXEL = {"resize": 48, "tile": 88}
PSD_BYTES_PER_PIXEL = 115  # more with --format psd or both (psd_layers, psd-tools)
LAYER_BYTES_PER_PIXEL = 8  # more per further pass, and per sample --select recompose keeps in hand
BLOCK_BYTES = 256 * inference.BLOCK_PIXELS  # and the temporaries of a block of rows, whatever the input's size
MEMORY_SHARE = 0.9  # of the memory available when an input is read
FORMATS = ("png", "psd", "both")
SELECT = ("all", "recompose")  # all: keep every sample; recompose: the one with the least recomposition error
SIDECAR_PREFIX = "decompose_"


def list_inputs(paths: list[str]) -> list[str]:
    """Image files of folders (sorted; the reader's extensions, `images.IMAGE_EXTS`, hidden files left out) and
    files as given; a file given twice is listed once. FileNotFoundError (one line, with the close matches) for a
    path that does not exist: a typo is refused, not skipped."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(cli.not_found(missing[0], "--input") + (f" (and {len(missing) - 1} more missing)"
                                                                         if len(missing) > 1 else ""))
    files, seen = [], set()
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        else:
            found = [p]
        for f in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    return files


def output_stems(files: list[str]) -> dict[str, str]:
    """Each input's output name stem: its file's stem; inputs sharing a stem get their extension added, and
    those sharing the file name too their parent folder(s), until every stem is unique."""
    stems = {f: os.path.splitext(os.path.basename(f))[0] for f in files}

    def clashing() -> set[str]:
        counts = collections.Counter(stems.values())
        return {f for f, s in stems.items() if counts[s] > 1}

    for f in clashing():
        stem, ext = os.path.splitext(os.path.basename(f))
        stems[f] = f"{stem}_{ext.lstrip('.')}" if ext else stem
    depth = 1
    while clashing() and depth <= 8:
        for f in clashing():
            parts = os.path.normpath(os.path.abspath(f)).split(os.sep)
            stem, ext = os.path.splitext(parts[-1])
            parents = [p for p in parts[-1 - depth:-1] if p]
            stems[f] = "_".join(parents + [stem] + ([ext.lstrip(".")] if ext else []))
        depth += 1
    for f in sorted(clashing()):  # still the same (e.g. only the case differs): number them
        stems[f] = f"{stems[f]}_{files.index(f)}"
    return stems


def fit_stem(stem: str, room: int) -> str:
    """`stem` if it takes at most `room` bytes as a file name, else its longest prefix (whole characters) that
    leaves room for `~` and 8 hex digits of the SHA-1 of the whole stem: the same input gets the same names in
    every run, and two long stems that differ anywhere get different ones."""
    if len(os.fsencode(stem)) <= room:
        return stem
    digest = hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]
    prefix = stem
    while prefix and len(os.fsencode(prefix)) > room - 9:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


class Interrupted(Exception):
    """Ctrl-C while decomposing: what was written is kept, with its sidecar; the message says how to finish."""


class NameRefused(ValueError):
    """The file system refused one output's name (too long, characters it does not take): that input is skipped."""


class WriteError(ValueError):
    """An output could not be written (e.g. the disk is full); what was written before is kept."""


class Stopped(Exception):
    """Raised by a `run(progress=...)` callback to stop the run between two batches of tiles, as Ctrl-C does:
    what was written is kept, with its sidecar, and `run` raises Interrupted (the app's Stop button)."""


def pass_tasks(task: str | list | tuple | None, passes: int) -> list[str | None]:
    """Each pass's task from `--task`: None, one task (every pass), or a comma list (or list) with one per pass;
    `auto` (or None) leaves that pass's task to the file name (pass 1) or the automatic choice. Raises
    ValueError (one line) for an unknown task or a list whose length is not 1 or `passes`."""
    if task is None:
        return [None] * passes
    parts = [p.strip() for p in task.split(",")] if isinstance(task, str) else [p if p is None else str(p).strip()
                                                                               for p in task]
    bad = [p for p in parts if p not in blend.TASKS and p not in (None, "auto")]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r} in --task {task}; choose from {', '.join(blend.TASKS)} or auto")
    if len(parts) not in (1, passes):
        raise ValueError(f"--task {','.join(str(p) for p in parts)} gives {len(parts)} tasks for --passes {passes}: "
                         f"give one task for every pass, or one per pass (comma-separated)")
    parts = [None if p == "auto" else p for p in parts]
    return parts * passes if len(parts) == 1 else parts


def stack_error(passes: list[tuple[str, np.ndarray, np.ndarray | None]], image: np.ndarray) -> float:
    """RMSE (0-1) of `image` against the written layers of every pass recomposed: `passes[p - 1]` = (task, 8-bit
    background, 8-bit RGBA foreground) of pass p; pass 1 removed the outermost overlay, so the input is
    law_1(fg_1, law_2(fg_2, ... law_N(fg_N, background_N)))."""
    sq = 0.0
    for r in inference.row_blocks(*image.shape[:2]):  # float64 temporaries of a block of rows, not of the image
        rec = np.asarray(passes[-1][1][r], np.float64) / 255.0
        for t, _, fg in reversed(passes):
            rec = np.asarray(blend.composite(t, np.asarray(fg[r], np.float64) / 255.0, rec))
        sq += float(np.sum((rec - np.asarray(image[r], np.float64)) ** 2))
    return float(np.sqrt(sq / image.size))


def layers_8bit(task: str, layers: inference.Layers, has_fg: bool) -> tuple[np.ndarray, np.ndarray | None,
                                                                             float | None]:
    """The 8-bit layers as written (background RGB, foreground straight RGBA: `blend.foreground_rgba`) and their
    recomposition RMSE (0-1; `blend.layers_error`; None without a foreground), made in blocks of rows."""
    h, w = layers.background.shape[:2]
    bg = np.empty((h, w, 3), np.uint8)
    fg = np.empty((h, w, 4), np.uint8) if has_fg else None
    sq = 0.0
    for r in inference.row_blocks(h, w):
        bg[r] = np.clip(np.rint(layers.background[r] * 255.0), 0, 255)
        if fg is not None:
            fg[r] = blend.quantize_rgba(np.asarray(blend.foreground_rgba(
                task, layers.foreground[r], layers.composite[r], layers.background[r])))
            sq += blend.layers_error(task, fg[r], bg[r], layers.composite[r]) ** 2 * bg[r].size
    return bg, fg, None if fg is None else float(np.sqrt(sq / bg.size))


def available_memory() -> int:
    """Bytes of memory available to this process now (psutil: free plus reclaimable)."""
    import psutil  # pylint: disable=g-import-not-at-top

    return int(psutil.virtual_memory().available)


def memory_estimate(pixels: int, mode: str, fmt: str = "png", passes: int = 1, held: int = 1) -> int:
    """Peak bytes of decomposing an input of `pixels` pixels (`BYTES_PER_PIXEL`; `held`: the samples whose layers
    are held together, --select recompose)."""
    per_pixel = (BYTES_PER_PIXEL[mode] + (PSD_BYTES_PER_PIXEL if fmt != "png" else 0)
                 + LAYER_BYTES_PER_PIXEL * (passes - 1 + held - 1))
    return pixels * per_pixel + BLOCK_BYTES


def check_size(path: str, mode: str, max_pixels: int | None = None, **estimate) -> None:
    """Raises ValueError (one line: the size, the estimate, what to do) before `path` is decoded if it has more
    pixels than `max_pixels`, or, without it, if decomposing it would take more memory than is available
    (`memory_estimate` against `MEMORY_SHARE` of `available_memory`). Sizes come from the file's header."""
    size = images.image_size(path)
    if size is None:
        return  # unreadable: the reader says why
    w, h = size
    pixels = w * h
    need = memory_estimate(pixels, mode, **estimate)
    where = f"{w}x{h} ({pixels / 1e6:.1f} Mpx)"
    if max_pixels is not None:
        if pixels > max_pixels:
            raise ValueError(f"{where} is more than --max-pixels {max_pixels}; downscale it, or raise --max-pixels "
                             f"(about {need / 1e9:.1f} GB needed in {mode} mode)")
        return
    room = int(available_memory() * MEMORY_SHARE)
    if need > room:
        cheaper = [m for m in BYTES_PER_PIXEL if m != mode and memory_estimate(pixels, m, **estimate) <= room]
        hint = f", use --mode {cheaper[0]}" if cheaper else ""
        raise ValueError(f"{where} would take about {need / 1e9:.1f} GB to decompose in {mode} mode (~"
                         f"{(need - BLOCK_BYTES) // pixels} bytes a pixel), more than the {room / 1e9:.1f} GB of "
                         f"memory available; downscale it{hint}, free memory, or pass --max-pixels {pixels} to try "
                         f"anyway")


def read_rgb(path: str) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] through the shared reader (`dd_jax.data.images.read_rgb`: EXIF
    orientation, 16-bit by bit depth, float images as they are, RGBA over white); raises ImageError."""
    return images.read_rgb(path, max_side=MAX_SIDE)


def task_from_name(path: str) -> str | None:
    """The task a file name starts with (`watermark_01.png` -> watermark), else None."""
    stem = os.path.basename(path).lower()
    return next((t for t in blend.TASKS if stem.startswith(t)), None)


def save_png(path: str, img: np.ndarray) -> None:
    """Writes `img` ([0, 1] floats or uint8) as a PNG at `path` (decompose writes it to a temporary name that
    `dd_jax.outdir.write_files` moves in)."""
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")


def write_sidecar(output: str, report: dict) -> str:
    """Writes `report` as `decompose_<UTC time>[_n].json` in `output` under a name no file has (a temporary file
    hard-linked to the first free name, so an existing file is never replaced); returns its path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    fd, tmp = tempfile.mkstemp(dir=output, prefix=f".{SIDECAR_PREFIX}", suffix=".json.partial")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        for n in range(1000):
            dest = os.path.join(output, f"{SIDECAR_PREFIX}{stamp}{f'_{n}' if n else ''}.json")
            try:
                os.link(tmp, dest)
                return dest
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "no free sidecar name", dest)
    finally:
        os.remove(tmp)


class _Progress:
    """One stderr line per image: tiles done / total, redrawn in place on a terminal; and `hook(label, done,
    total)` (run's `progress`) after every batch, the task choice's included."""

    def __init__(self, t0: float, hook: Callable[[str, int, int], None] | None = None):
        self.t0, self.tty, self.hook = t0, sys.stderr.isatty(), hook

    def __call__(self, tag, done: int, total: int) -> None:
        if self.hook is not None:
            self.hook(tag[1], done, total)
        if self.tty and done < total:
            print(f"\r  {tag[1]}: {done}/{total} tiles ({time.time() - self.t0:.1f}s)", end="", file=sys.stderr,
                  flush=True)

    def finish(self, tag, total: int, note: str) -> None:
        end = "\x1b[K" if self.tty else ""
        print(f"\r  {tag[1]}: {total}/{total} tiles ({time.time() - self.t0:.1f}s){note}{end}", file=sys.stderr,
              flush=True)


def _check_arguments(task, steps: int | None, num_samples: int, batch_size: int, mode: str | None, fmt: str,
                     select: str, passes: int, max_pixels: int | None) -> list[str | None]:
    """Stage 1: the arguments alone, before anything is read or made (ValueError, one line). Returns each pass's
    task (`pass_tasks`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if select not in SELECT:
        raise ValueError(f"unknown --select {select!r}; choose from {', '.join(SELECT)}")
    if fmt != "png":
        psd_layers.check_available()
    if passes < 1:
        raise ValueError(f"--passes {passes}: at least one pass")
    per_pass = pass_tasks(task, passes)
    if mode is not None and mode not in inference.MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(inference.MODES)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: at least one sampling step")
    if num_samples < 1 or batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels {max_pixels}: at least one pixel")
    if select == "recompose" and num_samples == 1:
        raise ValueError("--select recompose keeps the best of --num-samples K > 1 samples; with one there is "
                         "nothing to choose: pass --num-samples K, or drop --select")
    return per_pass


@dataclasses.dataclass
class _Settings:
    """A run's settings once the model is loaded: its defaults filled in, checked against it."""
    per_pass: list[str | None]  # each pass's task (None: from the file name for pass 1, else chosen)
    steps: int
    mode: str
    tile: tuple[int, int]
    overlap: int
    has_fg: bool  # the model predicts the foreground layer
    num_samples: int
    kept: int  # outputs per input: 1 with --select recompose, else num_samples
    passes: int
    fmt: str
    select: str
    seed: int
    batch_size: int
    guidance: float | None
    prompt: str | None
    detail_transfer: bool
    max_pixels: int | None

    @classmethod
    def resolve(cls, system, per_pass: list[str | None], *, steps: int | None, mode: str | None,
                overlap: int | None, detail_transfer: bool, prompt: str | None, guidance: float | None,
                num_samples: int, select: str, **rest) -> _Settings:
        cfg = system.config
        steps = cfg.sample.steps if steps is None else steps
        inference.check_options(system, mode or inference.default_mode(cfg), mode_given=mode is not None,
                                overlap=overlap, detail_transfer=detail_transfer, prompt=prompt, guidance=guidance)
        mode = mode or inference.default_mode(cfg)
        tile = inference.working_size(system)
        overlap = inference.default_overlap(tile) if overlap is None else overlap
        if mode == "tile" and not 0 <= overlap < min(tile):
            raise ValueError(f"--overlap must be in [0, {min(tile)}) for tiles of {tile[0]}x{tile[1]}")
        has_fg = "x" in system.spec.targets
        if select == "recompose" and not has_fg:
            raise ValueError("--select recompose needs a model that predicts the foreground layer (no recomposition "
                             "without it)")
        return cls(per_pass, steps, mode, tile, overlap, has_fg, num_samples,
                   1 if select == "recompose" else num_samples, select=select, detail_transfer=detail_transfer,
                   prompt=prompt, guidance=guidance, **rest)


class _Names:
    """Stage 2: the output files of every input. One pass: <stem>_foreground.png; N passes:
    <stem>_foreground_<p>.png; K kept samples: <stem>_s<k>_...; stems the file system would refuse as too long
    (NAME_MAX bytes) shortened, the same in every run (`fit_stem`)."""

    def __init__(self, files: list[str], output: str, s: _Settings):
        self.output, self.fmt, self.kept = output, s.fmt, s.kept
        self.fg_kinds = (["foreground"] if s.passes == 1 else [f"foreground_{p}" for p in range(1, s.passes + 1)]
                         ) if s.has_fg else []
        self.stems = output_stems(files)
        room = outdir.name_max(output) - max(len(os.fsencode(n)) for k in range(self.kept)
                                              for n in self.kinds(self.suffix(k)).values())
        self.shortened = {f: fit_stem(st, room) for f, st in self.stems.items() if fit_stem(st, room) != st}
        self.stems.update(self.shortened)

    def kinds(self, stem: str) -> dict[str, str]:
        """Output kind (background, foreground[_p], psd) -> file name."""
        names = {kind: f"{stem}_{kind}.png" for kind in ["background"] + self.fg_kinds} if self.fmt != "psd" else {}
        if self.fmt != "png":
            names["psd"] = f"{stem}.psd"
        return names

    def suffix(self, k: int) -> str:
        return f"_s{k}" if self.kept > 1 else ""

    def stem(self, path: str, k: int) -> str:
        return self.stems[path] + self.suffix(k)

    def planned(self, path: str) -> list[str]:
        return [os.path.join(self.output, name) for k in range(self.kept)
                for name in self.kinds(self.stem(path, k)).values()]

    def to_do(self, files: list[str], protected: set[str], overwrite: bool,
              skip_existing: bool) -> tuple[list[str], list[str]]:
        """(the inputs to decompose, those already done: with `skip_existing`, every output there); ValueError
        (one line) if an output to write exists and may not be replaced, or is an input."""
        planned_of = {f: self.planned(f) for f in files}
        already_done = [f for f in files if skip_existing and all(
            os.path.isfile(p) and os.path.realpath(p) not in protected for p in planned_of[f])]
        files = [f for f in files if f not in already_done]
        planned = [p for f in files for p in planned_of[f]]
        existing = [p for p in planned if os.path.lexists(p) and (not overwrite or os.path.realpath(p) in protected)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            if any(os.path.realpath(p) in protected for p in existing):
                raise ValueError(f"{existing[0]}{more} would be written over an input; choose another --output")
            if skip_existing:
                raise ValueError(f"{existing[0]}{more} exists but not every output of its input does: pass "
                                 f"--overwrite too to redo such inputs, or choose another --output")
            raise ValueError(f"{existing[0]}{more} exists; decompose writes over no file it did not write in this "
                             f"run: pass --skip-existing to finish an interrupted run (inputs whose outputs all "
                             f"exist are left alone), --overwrite to replace its outputs, or choose another --output")
        return files, already_done


class _Job:
    """Stage 3: decomposing the inputs and writing their layers. `items` reads the inputs (and queues each
    pass's background for the next), `decompose` runs the model over them in rounds, `finish` writes an input's
    layers once its last pass is done (with --select recompose: once all its samples are), `report` the sidecar."""

    def __init__(self, system, head, s: _Settings, names: _Names, output: str, files: list[str],
                 index: dict[str, int], protected: set[str], overwrite: bool,
                 progress: Callable[[str, int, int], None] | None = None):
        self.system, self.head, self.s, self.names, self.output = system, head, s, names, output
        self.files, self.index, self.protected, self.overwrite = files, index, protected, overwrite
        self.skipped: list[str] = []
        self.skip_messages: dict[str, str] = {}  # input -> why it was skipped (the line printed)
        self.written = 0
        self.tasks_used: dict[str, str] = {}
        self.done: list[str] = []  # files written
        self.records: list[dict] = []  # the sidecar's, one per output
        self.t0 = time.time()
        self.progress = _Progress(self.t0, progress)
        self.key = jax.random.key(s.seed)
        self.auto_key = jax.random.fold_in(self.key, 2**31 - 1)  # task choice: its own noise
        # Pass p > 1 of an input decomposes the 8-bit background its pass p - 1 wrote: queued here when that pass
        # is done, and fed to the model before the next input is read (so memory follows the images in flight).
        self.next_passes: collections.deque = collections.deque()  # (path, name, n, k, pass, image)
        self.how_chosen: dict[tuple, str] = {}  # (path, k, pass) -> how its task was chosen
        self.chains: dict[tuple, list] = {}  # (path, k) -> its passes so far: (task, bg, fg, recomposition error)
        self.inputs: dict[tuple, np.ndarray] = {}  # (path, k) -> the input (pass 1's composite)
        self.pending: dict[str, list] = collections.defaultdict(list)  # --select recompose: an input's samples

    def announce_start(self) -> None:
        s = self.s
        print(f"decomposing {len(self.files)} file(s), mode {s.mode} ({s.tile[0]}x{s.tile[1]} "
              f"{'tiles, overlap ' + str(s.overlap) if s.mode == 'tile' else 'working size'}), {s.steps} steps, "
              f"{s.num_samples} sample(s) each{', keeping the best recomposition' if s.kept < s.num_samples else ''}"
              f"{f', {s.passes} passes' if s.passes > 1 else ''}", file=sys.stderr)
        for f, stem in self.names.shortened.items():
            print(f"  {os.path.basename(f)}: its output names would be too long for {self.output}; written as "
                  f"{stem}_... (the sidecar maps the input to them)", file=sys.stderr)

    # ---- reading the inputs
    def pick_task(self, p: int, path: str, img: np.ndarray, choice_key, label: str) -> tuple[str, str]:
        """Pass p's task and how it was chosen: --task's entry, else (pass 1) the file name, else automatic."""
        s = self.s
        t, how = s.per_pass[p - 1], "--task"
        if t is None and p == 1:
            t, how = task_from_name(path), "file name"
        if t is None:
            hook = self.progress.hook
            t, scores = inference.choose_task(self.system, img, steps=s.steps, key=choice_key,
                                              batch_size=s.batch_size, guidance=s.guidance, prompt=s.prompt,
                                              head=self.head, progress=None if hook is None else (
                                                  lambda done, total: hook(f"{label}, choosing the task", done,
                                                                           total)))
            how = "chosen automatically: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        return t, how

    def announce(self, label: str, img: np.ndarray, t: str, how: str) -> None:
        h, w = img.shape[:2]
        count = inference.tile_count(h, w, self.s.tile, self.s.overlap) if self.s.mode == "tile" else 1
        print(f"  {label} ({w}x{h}): task {t} ({how}); {count} tile(s)", file=sys.stderr)

    def items(self, file_iter):
        """(tag, image, task) for the model: the queued next passes first, then the next input read."""
        s = self.s
        while True:
            while self.next_passes:
                path, name, n, k, p, img = self.next_passes.popleft()
                label = f"{name}, pass {p}" + (f", sample {k}" if s.num_samples > 1 else "")
                t, how = self.pick_task(p, path, img, jax.random.fold_in(jax.random.fold_in(self.auto_key, n),
                                                                        1000 * p + k), label)
                self.how_chosen[path, k, p] = how
                self.announce(label, img, t, how)
                yield (path, label, k, t, p), img, t
            nxt = next(file_iter, None)
            if nxt is None:
                return
            n, path = nxt
            try:
                check_size(path, s.mode, s.max_pixels, fmt=s.fmt, passes=s.passes, held=s.num_samples - s.kept + 1)
                img = read_rgb(path)
            except Exception as e:  # unreadable file: report and go on
                self.skip(path, e)
                continue
            name = os.path.basename(path)
            label = name if s.passes == 1 else f"{name}, pass 1"
            t, how = self.pick_task(1, path, img, jax.random.fold_in(self.auto_key, n), label)
            self.announce(label, img, t, how)
            for k in range(s.num_samples):
                self.how_chosen[path, k, 1] = how
                yield (path, label, k, t, 1), img, t

    def skip(self, path: str, e: Exception) -> None:
        """An input left out (unreadable, too large, a name refused): one line, and the batch goes on."""
        if path not in self.skipped:
            self.skipped.append(path)
        self.skip_messages[path] = str(e)
        print(f"skipping {path}: {e}", file=sys.stderr)

    # ---- the model, in rounds of passes
    def decompose(self) -> bool:
        """Runs every input's passes, writing each as its last is done; True if interrupted (Ctrl-C)."""
        s = self.s
        file_iter = iter((self.index[f], f) for f in self.files)
        try:
            for rnd in range(s.passes):  # a round ends with its stream; passes still owed then are the next round's
                stream = inference.decompose_stream(
                    self.system, self.items(file_iter), steps=s.steps,
                    key=self.key if rnd == 0 else jax.random.fold_in(self.key, 2**30 + rnd), mode=s.mode,
                    batch_size=s.batch_size, overlap=s.overlap, guidance=s.guidance, prompt=s.prompt,
                    detail_transfer=s.detail_transfer, progress=self.progress)
                for tag, layers in stream:
                    last = self.pass_done(tag, layers)
                    del layers  # its full-size float layers: gone before the 8-bit ones are written
                    if last is not None:
                        self.finish(*last)
                if not self.next_passes:
                    break
        except inference.NonFiniteOutput as e:  # a broken model: stop rather than write black layers
            raise ValueError(f"{e}; stopped: the {len(self.done)} file(s) written before ({self.written} "
                             f"decomposition(s)) are kept in {self.output}") from e
        except (KeyboardInterrupt, Stopped):  # Ctrl-C, or Stop: what is written is whole; its sidecar comes after
            if self.progress.tty:
                print(file=sys.stderr)  # end the progress line
            return True
        return False

    def pass_done(self, tag, layers: inference.Layers) -> tuple | None:
        """One pass of one input (or sample) decomposed: its 8-bit layers kept, and the next pass queued; after
        the last pass, returns the arguments of `finish` (path, sample, passes, input)."""
        s = self.s
        path, _, k, t, p = tag
        bg, fg, err = layers_8bit(t, layers, s.has_fg)
        if p == 1:
            self.inputs[path, k] = layers.composite
        self.chains.setdefault((path, k), []).append((t, bg, fg, err))
        note = "" if err is None else f", recomposition RMSE {err * 255:.2f}/255"
        self.progress.finish(tag, inference.tile_count(*layers.composite.shape[:2], s.tile, s.overlap)
                             if s.mode == "tile" else 1, note)
        if p < s.passes:  # the next pass decomposes the background as written (8-bit)
            nxt = bg.astype(np.float32)
            nxt /= 255.0
            self.next_passes.append((path, os.path.basename(path), self.index[path], k, p + 1, nxt))
            return None
        return path, k, self.chains.pop((path, k)), self.inputs.pop((path, k))

    # ---- writing the layers
    def finish(self, path: str, k: int, chain: list, image: np.ndarray) -> None:
        """Writes one input's (or sample's) layers once its last pass is done."""
        s = self.s
        outs = [(k, chain, None if not s.has_fg else stack_error([c[:3] for c in chain], image))]
        sample_errors = None
        if s.kept < s.num_samples:
            self.pending[path].append(outs[0])
            if len(self.pending[path]) < s.num_samples:
                return
            samples = sorted(self.pending.pop(path), key=lambda o: o[0])
            sample_errors = [o[2] for o in samples]
            outs = [samples[int(np.argmin(sample_errors))]]
        for k, chain, err in outs:
            record, files = self.output_files(path, k, chain, err, image, sample_errors)
            try:
                self.save(files)
            except NameRefused as e:  # this input only: reported, skipped; the batch goes on
                self.skip(path, e)
                continue
            self.records.append(record)
            self.tasks_used[path] = record["task"]
            if s.passes > 1 or sample_errors is not None:
                note = "" if err is None else f"recomposition RMSE {err * 255:.2f}/255"
                if s.passes > 1 and err is not None:
                    note += " (all passes)"
                if sample_errors is not None:
                    note += f", sample {k} of {s.num_samples} kept (" + ", ".join(f"{e * 255:.2f}"
                                                                             for e in sample_errors) + ")"
                print(f"  {os.path.basename(path)}: {note or 'written'}", file=sys.stderr)
            self.written += 1

    def output_files(self, path: str, k: int, chain: list, err: float | None, image: np.ndarray,
                     sample_errors: list | None) -> tuple[dict, list[tuple[str, Callable[[str], object]]]]:
        """The sidecar's record of one output and its files: (destination, writer) pairs."""
        s = self.s
        bg = chain[-1][1]  # the last pass's background
        names = self.names.kinds(self.names.stem(path, k))
        hows = [self.how_chosen[path, k, p] for p in range(1, s.passes + 1)]
        record = {"input": path, "task": ",".join(c[0] for c in chain),
                  "task_from": hows[0] if s.passes == 1 else hows, "size": list(bg.shape[1::-1]), "sample": k,
                  "outputs": {}, "recompose_rmse": None if err is None else round(err * 255, 4),
                  "passes": [{"pass": p, "task": c[0], "task_from": hows[p - 1],
                              "recompose_rmse": None if c[3] is None else round(c[3] * 255, 4),
                              "foreground": names.get(self.names.fg_kinds[p - 1]) if s.has_fg else None}
                             for p, c in enumerate(chain, 1)]}
        if sample_errors is not None:
            record["sample_recompose_rmse"] = [round(e * 255, 4) for e in sample_errors]
        files = []
        for kind, fname in names.items():
            dest = os.path.join(self.output, fname)
            if kind == "background":
                files.append((dest, functools.partial(save_png, img=bg)))
            elif kind.startswith("foreground"):
                p = 1 if kind == "foreground" else int(kind.rsplit("_", 1)[1])
                files.append((dest, functools.partial(save_png, img=chain[p - 1][2])))
            else:
                stack = psd_layers.pass_layers([c[:3] for c in chain])
                psd_img = psd_layers.composite(stack)
                files.append((dest, functools.partial(psd_layers.write, psd_layers=stack)))
                record["psd_layers"] = [{"name": n, "mode": psd_layers.MODES[m]} for n, m, _ in stack]
                record["psd_rmse"] = round(blend.rmse(psd_img, image) * 255, 4)
            record["outputs"][kind] = fname
        if path in self.names.shortened:
            record["names_shortened"] = True
        return record, files

    def save(self, files: list[tuple[str, Callable[[str], object]]]) -> None:
        """Writes one output's files together (`outdir.write_files`): all of them or none."""
        for dest, _ in files:
            if os.path.realpath(dest) in self.protected:  # checked before; an input that appeared since
                raise ValueError(f"{dest} would be written over an input; choose another --output")
        kept_msg = (f"the {len(self.done)} file(s) written before ({self.written} decomposition(s)) are kept in "
                    f"{self.output}")
        try:
            outdir.write_files(files, overwrite=self.overwrite)
        except FileExistsError as e:
            raise WriteError(f"{e.filename} appeared during the run (another program wrote it) and was kept, "
                             f"not replaced: stopped; {kept_msg}") from e
        except OSError as e:
            if outdir.is_name_error(e):
                raise NameRefused(f"{e.strerror or e} writing {files[0][0]}: the file system refuses the "
                                  f"name") from e
            why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise WriteError(f"{why} writing {files[0][0]}{f' and {len(files) - 1} more' if len(files) > 1 else ''}"
                             f": stopped, its partial files removed; {kept_msg}") from e
        self.done.extend(dest for dest, _ in files)

    # ---- the sidecar
    def report(self, checkpoint: str | None, already_done: list[str], interrupted: bool) -> str:
        """Writes the run's JSON sidecar; returns its path."""
        s = self.s
        report = {"tool": "dd_jax.decompose", "rmse_scale": "0-255", "recompose_rmse": "RMSE of the input against "
                  "the task's blend law applied to the written 8-bit layers (dd_jax.data.blend.layers_error)",
                  "checkpoint": checkpoint or checkpoints.DEFAULT_MODEL, "steps": s.steps, "seed": s.seed,
                  "mode": s.mode, "overlap": s.overlap if s.mode == "tile" else None, "batch_size": s.batch_size,
                  "guidance": s.guidance, "num_samples": s.num_samples, "select": s.select, "format": s.fmt,
                  "quantize": self.system.config.model.get("quantize", "") or None, "images": self.records,
                  "skipped": self.skipped, "already_done": already_done, "interrupted": interrupted,
                  "seconds": round(time.time() - self.t0, 2)}
        try:
            sidecar = write_sidecar(self.output, report)
        except OSError as e:
            raise WriteError(f"{e.strerror or e} writing the run's JSON sidecar in {self.output}; the "
                             f"{len(self.done)} file(s) written ({self.written} decomposition(s)) are kept") from e
        print(f"recomposition errors and settings: {sidecar}", file=sys.stderr)
        return sidecar


@dataclasses.dataclass
class Model:
    """A loaded model, what `run` decomposes with: `load_model` makes one (the app keeps one for every request)."""
    system: object  # dd_jax.system.System
    head: inference.TaskHead | None  # the automatic task choice's calibration (None: uncalibrated)
    path: str  # the model folder or training workdir it came from (the sidecar's `checkpoint`)


def load_model(checkpoint: str | None = None, config_file: str | None = None, quantize: str | None = None) -> Model:
    """The model of `checkpoint` (default: the shipped model) with `config_file` overriding its settings and its
    weights stored as `quantize` says, and its task head."""
    path = checkpoint or checkpoints.DEFAULT_MODEL
    config = config_lib.load_config_file(config_file) if config_file else None
    with quantize_lib.requested(quantize):  # a LoRA base quantized as it loads, a model trained in full after
        loaded = checkpoints.load_trained(path, config, config_source=f"--config {config_file}")
        system = system_lib.for_sampling(loaded)
    return Model(system, inference.load_task_head(path), path)  # head None: uncalibrated task choice


def run(inputs: list[str], output: str, checkpoint: str | None = None, config_file: str | None = None,
        task: str | None = None, steps: int | None = None, seed: int = 0, num_samples: int = 1,
        batch_size: int = 16, guidance: float | None = None, detail_transfer: bool = True,
        prompt: str | None = None, mode: str | None = None, overlap: int | None = None,
        overwrite: bool = False, fmt: str = "png", select: str = "all", passes: int = 1,
        max_pixels: int | None = None,
        skip_existing: bool = False, quantize: str | None = None, model: Model | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Decomposes `inputs` into `output` (see the module docstring); returns a summary with `written`
    (decompositions), `files` (written), `skipped` (unreadable inputs) and `skip_messages` (input -> the line
    saying why), `already_done` (with `skip_existing`: the inputs whose outputs all exist, left alone), `tasks`,
    `images` (the sidecar's per-output records) and `sidecar` (its path; None when there was nothing to do).
    `task`: one task, or one per pass (a comma list or a list; `auto` or None: from the file name for pass 1, else
    chosen automatically). Raises ValueError (one line) for bad arguments or outputs that exist (without
    `overwrite`), WriteError when a write fails, Interrupted (after writing the sidecar of what was done) on
    Ctrl-C while decomposing. An input larger than `max_pixels`, or without it than the memory available allows
    (`check_size`), is skipped before it is decoded.

    `model`: loaded already (`load_model`), instead of `checkpoint`, `config_file` and `quantize`.
    `progress(label, done, total)`: called after every batch of tiles for each input it touched (tiles done of
    the input's total; while a task is chosen automatically, its probes); raising `Stopped` in it stops the run
    as Ctrl-C does (Interrupted).

    Stages: the arguments (`_check_arguments`), the inputs and the output folder, the model and the settings
    it implies (`_Settings`), the output names and what is there already (`_Names`), then the decomposition,
    its files and sidecar (`_Job`)."""
    if model is not None and (checkpoint or config_file or quantize):
        raise ValueError("run: pass a loaded model or checkpoint / config_file / quantize, not both")
    per_pass = _check_arguments(task, steps, num_samples, batch_size, mode, fmt, select, passes, max_pixels)
    outdir.check_folder(output)
    files = list_inputs(inputs)
    if not files:
        raise ValueError(f"no image files in {', '.join(inputs)} ({', '.join(IMAGE_EXTENSIONS)})")
    with outdir.locked(output, "decompose"):  # until the run ends: one run at a time writes the folder
        model = model or load_model(checkpoint, config_file, quantize)
        system = model.system
        settings = _Settings.resolve(system, per_pass, steps=steps, mode=mode, overlap=overlap,
                                     detail_transfer=detail_transfer, prompt=prompt, guidance=guidance,
                                     num_samples=num_samples, select=select, passes=passes, fmt=fmt, seed=seed,
                                     batch_size=batch_size, max_pixels=max_pixels)
        protected = {os.path.realpath(f) for f in files}
        names = _Names(files, output, settings)
        index = {f: n for n, f in enumerate(files)}  # an input's place in the whole list: its task-choice noise
        files, already_done = names.to_do(files, protected, overwrite, skip_existing)
        if already_done:
            print(f"{len(already_done)} input(s) already done in {output} (--skip-existing): left as they are",
                  file=sys.stderr)
        if not files:
            print("nothing to do", file=sys.stderr)
            return {"written": 0, "files": [], "skipped": [], "skip_messages": {}, "already_done": already_done,
                    "output": output, "tasks": {}, "images": [], "sidecar": None}
        job = _Job(system, model.head, settings, names, output, files, index, protected, overwrite, progress)
        job.announce_start()
        interrupted = job.decompose()
        sidecar = job.report(model.path, already_done, interrupted)
        if interrupted:
            raise Interrupted(f"interrupted: {job.written} decomposition(s) written to {output} are kept (sidecar "
                              f"{os.path.basename(sidecar)}); to finish the rest, rerun the same command with "
                              f"--skip-existing")
        return {"written": job.written, "files": job.done, "skipped": job.skipped,
                "skip_messages": job.skip_messages, "already_done": already_done, "output": output,
                "tasks": job.tasks_used, "images": job.records, "sidecar": sidecar}


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m dd_jax.decompose", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("--output", required=True)
    ap.add_argument("--checkpoint", default=None,
                    help="trained model folder or training workdir (default: shipped tiny model)")
    ap.add_argument("--config", default=None,
                    help="config file overriding the checkpoint's settings (e.g. another base path); a config of "
                         "another architecture is refused (checkpoints.ARCHITECTURE)")
    ap.add_argument("--task", default=None, metavar="TASK[,TASK...]",
                    help=f"blend law, one of {', '.join(blend.TASKS)} (default: from the file name, else chosen "
                         f"automatically); with --passes N: one task for every pass, or N comma-separated, pass 1 "
                         f"first (auto: chosen automatically for that pass)")
    ap.add_argument("--passes", type=int, default=1,
                    help="decompose N times, each pass the background of the one before (several overlays, the "
                         "outermost first): writes <stem>_foreground_1.png ... _N.png in pass order and the last "
                         "pass's <stem>_background.png; the PSD layers, bottom to top: background, foreground N, "
                         "..., foreground 1 (default 1: the plain names)")
    ap.add_argument("--mode", default=None, choices=inference.MODES,
                    help="tile: native resolution in overlapping tiles; resize: whole image at the working size "
                         "(default: the model's config, sample.tile)")
    ap.add_argument("--overlap", type=int, default=None,
                    help="tile overlap in pixels (default: a quarter of the tile side, 16 for 64x64 tiles)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="skip inputs with more pixels than this, before decoding them (default: those that would "
                         "take more memory than is available, estimated from their header: see BYTES_PER_PIXEL)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's sample.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1, help="samples per input (different noise)")
    ap.add_argument("--select", default="all", choices=SELECT,
                    help="with --num-samples K > 1: all: write every sample (<stem>_s<k>_...); recompose: keep "
                         "only the sample whose layers recompose the input best, under the plain names")
    ap.add_argument("--format", default="png", choices=FORMATS, dest="fmt",
                    help="png: <stem>_background.png and <stem>_foreground.png (RGBA); psd: <stem>.psd, layers "
                         "bottom to top 'background' (Normal), 'foreground (<task>)' in the task's blend mode "
                         "(watermark/occlusion Normal, xray Multiply, cell/flare Linear Dodge (Add); glassware: "
                         "'foreground (glassware, multiply)' under 'foreground (glassware, screen)'); both: all")
    ap.add_argument("--batch-size", type=int, default=16, help="tiles per model call (fixed shape)")
    ap.add_argument("--quantize", default=None, choices=quantize_lib.QTYPES + ("none",),
                    help="store the transformer's weights (and T5's) quantized: int8/fp8/int4 weight-only, fp8_w8a8 "
                         "float8 matmuls (dd_jax.quantize; default: the model's config, model.quantize; none: float)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--no-detail-transfer", action="store_true", help="--mode resize: plain resize of the background")
    ap.add_argument("--prompt", default=None, help="text prompt for T5/CLIP-conditioned models (default: the task's)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace output files that exist (never an input); without it the run refuses them")
    ap.add_argument("--skip-existing", action="store_true",
                    help="leave alone the inputs whose outputs all exist (to finish an interrupted run: rerun the "
                         "same command with it); an input with only some of its outputs is refused unless "
                         "--overwrite is given too (then it is redone)")
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        ap.error("--num-samples and --batch-size must be >= 1")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: at least one sampling step")
    if args.passes < 1:
        ap.error(f"--passes {args.passes}: at least one pass")
    try:
        pass_tasks(args.task, args.passes)
    except ValueError as e:
        ap.error(str(e))
    try:
        out = run(args.input, args.output, args.checkpoint, args.config, args.task, args.steps, args.seed,
                  args.num_samples, args.batch_size, args.guidance, not args.no_detail_transfer, args.prompt,
                  args.mode, args.overlap, max_pixels=args.max_pixels, overwrite=args.overwrite, fmt=args.fmt,
                  select=args.select, passes=args.passes, skip_existing=args.skip_existing, quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    except KeyboardInterrupt:
        print(f"interrupted: what was written to {args.output} is kept; to finish the rest, rerun the same command "
              f"with --skip-existing", file=sys.stderr)
        return 130
    print(f"wrote {out['written']} decomposition(s) to {args.output}; skipped {len(out['skipped'])}", file=sys.stderr)
    return 1 if out["skipped"] else 0  # 0: every input done; 1: some skipped (each reported above)


if __name__ == "__main__":
    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    sys.exit(main())
