"""TFDS builder ``alphablend``: one config per subtask, synthesized on the spot.

Features (all images PNG, any size; the build size is in the metadata):
  composite  uint8 [H, W, 3]  the blended image
  background uint8 [H, W, 3]
  foreground uint8 [H, W, 4]  straight RGBA
  caption    text             the paper's three-sub-image prompt
  task       class label      index into ``blend.TASKS``

Written as array_record files with TFDS's own writer (no TensorFlow). TFDS
generates into an ``incomplete.*`` directory, writes ``dataset_info.json``
into it last and renames it when done, so a killed build leaves nothing that
reads as a dataset (the next build of the task removes or ignores the
leftover). The build parameters (size, counts, seed, style, user folders)
are stored in the metadata (``metadata.json``): ``build`` refuses to reuse a
dataset built with other ones (``parameter_diff``). Read back with
``tfds.builder_from_directory(DIR/alphablend/<task>/1.0.0)`` or
``tfds.data_source('alphablend/<task>', data_dir=DIR)``.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dd_jax.data import blend, synth

PNG_LEVEL = 3  # zlib level: ~2x faster than PIL's default 6 for ~5% more bytes


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: TFDS' default ``code_path`` probes the
    ``importlib_resources`` backport, absent on Python >= 3.9 installs."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
        return epath.Path(sys.modules[cls.__module__].__file__)


def layer_features() -> tfds.features.FeaturesDict:
    """The feature spec shared by ``alphablend`` and ``logo``."""
    return tfds.features.FeaturesDict({
        "composite": tfds.features.Image(shape=(None, None, 3)),
        "background": tfds.features.Image(shape=(None, None, 3)),
        "foreground": tfds.features.Image(shape=(None, None, 4)),
        "caption": tfds.features.Text(),
        "task": tfds.features.ClassLabel(names=list(blend.TASKS)),
    })


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="png", compress_level=PNG_LEVEL)
    return buf.getvalue()


def encode(sample: synth.Sample) -> dict:
    return {"composite": png(sample.composite), "background": png(sample.background),
            "foreground": png(sample.foreground), "caption": sample.caption, "task": sample.task}


# --- worker processes (module level so that 'spawn' can import them)
_WORKER: dict = {}


def _init_worker(kwargs: dict) -> None:
    logging.disable(logging.WARNING)
    _WORKER["synth"] = synth.Synthesizer(**kwargs)


def _make(job):
    split, index = job
    return _safe_sample(_WORKER["synth"], split, index)


def _safe_sample(s: synth.Synthesizer, split: str, index: int):
    try:
        smp = s.sample(index, split)
    except Exception as e:  # pylint: disable=broad-except  # never kill the build
        return index, None, [("skipped", "failed_sample", f"{split}/{index}: {e!r}")]
    return index, encode(smp), smp.events


class AlphablendConfig(tfds.core.BuilderConfig):
    def __init__(self, *, task: str, **kwargs):
        super().__init__(name=task, description=f"AlphaBlend subtask {task!r}", **kwargs)
        self.task = task


class Alphablend(_Builder):
    """Synthetic AlphaBlend (DiffDecompose sec. 3.1) for one subtask per config."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: procedural foregrounds, six blend laws."}
    BUILDER_CONFIGS = [AlphablendConfig(task=t) for t in blend.TASKS]

    def __init__(self, *, height: int = 512, width: int = 512, num_train: int = 8, num_test: int = 2,
                 backgrounds: str | None = None, foregrounds: str | None = None, seed: int = 0,
                 workers: int = 0, min_side: int | None = None, style: str = "classic", **kwargs):
        self.synth_kwargs = dict(height=int(height), width=int(width), backgrounds=_abs(backgrounds),
                                 foregrounds=_abs(foregrounds), seed=int(seed), min_side=min_side, style=style)
        self.num_examples = {"train": int(num_train), "test": int(num_test)}
        self.workers = int(workers)
        self.summary: dict = {}
        self._synth = None
        super().__init__(**kwargs)

    def parameters(self) -> dict:
        """What the data depends on, as stored in the metadata (``workers`` does not change it)."""
        return dict(self.synth_kwargs, num_examples=dict(self.num_examples))

    def prepare_sources(self) -> None:
        """Scans the user folders (raises ``backgrounds.SourceError`` when one has no usable image); done
        before TFDS touches the output, so a bad folder costs nothing."""
        if self._synth is None:
            self._synth = synth.Synthesizer(**self.synth_kwargs, task=self.builder_config.task)
            self.reports = self._synth.reports()

    def _info(self) -> tfds.core.DatasetInfo:
        meta = tfds.core.MetadataDict(**self.parameters())
        meta["summary"] = self.summary
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=layer_features(),
            metadata=meta,
            homepage="https://arxiv.org/abs/2505.21541",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        kwargs = dict(self.synth_kwargs, task=self.builder_config.task)
        self.prepare_sources()  # scans user folders once, up front
        self.summary.update({"task": self.builder_config.task, "failed_samples": 0, "examples": {}})
        return {split: self._generate_examples(split, n, kwargs)
                for split, n in self.num_examples.items() if n > 0}

    def _generate_examples(self, split: str, n: int, kwargs: dict):
        jobs = [(split, i) for i in range(n)]
        pool = None
        if self.workers > 0:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(kwargs,))
            results = pool.imap(_make, jobs, chunksize=2)
        else:
            results = (_safe_sample(self._synth, s, i) for s, i in jobs)
        written, first_failure = 0, None
        try:
            for index, example, events in results:
                self._record(events)
                if example is None:
                    self.summary["failed_samples"] += 1
                    first_failure = first_failure or next((e[2] for e in events if e[1] == "failed_sample"), "")
                    continue
                written += 1
                yield index, example
        finally:
            if pool is not None:
                pool.terminate()
        if written == 0:  # TFDS would stop on an AssertionError that hides why
            raise BuildError(f"no {split} example could be made: all {n} samples failed (first: {first_failure})")
        self.summary["examples"][split] = written
        self.info.metadata["summary"] = self.finish_summary()

    def _record(self, events) -> None:
        bg = self.reports.get("backgrounds")
        fg = self.reports.get("foregrounds")
        failed = [e for e in events if e[1] == "failed_sample"]
        for e in failed:
            logging.warning("sample failed: %s", e[2])
        for report in (bg, fg):
            if report is not None:
                root = os.path.abspath(report.folder)
                report.merge(e for e in events if e[1] != "failed_sample"
                             and os.path.abspath(e[2]).startswith(root))

    def finish_summary(self) -> dict:
        out = dict(self.summary)
        for name, report in self.reports.items():
            out[name] = report.counts()
        return out


def counted_examples(builder, split: str, reads, empty_error: str | None = None):
    """Yields the (key, example) of `reads`, (key, read(events) -> example or None) pairs, for the benchmark
    builders: skipped events are counted in `builder.summary["skipped"]`, written examples in
    `summary["examples"][split]`, both stored in the metadata. `empty_error`: raise BuildError with it when
    nothing was readable."""
    n = 0
    for key, read in reads:
        events: list = []
        ex = read(events)
        for kind, reason, _ in events:
            if kind == "skipped":
                builder.summary["skipped"][reason] += 1
        if ex is not None:
            n += 1
            yield key, ex
    if n == 0 and empty_error:
        raise BuildError(empty_error)
    builder.summary["examples"][split] = n
    builder.info.metadata["summary"] = {"examples": dict(builder.summary["examples"]),
                                        "skipped": dict(builder.summary["skipped"])}


class BuildError(RuntimeError):
    """A build that cannot make its examples; the text says why."""


def _abs(path: str | None) -> str | None:
    return os.path.abspath(os.fspath(path)) if path else None


_LABELS = {"height": "height", "width": "width", "seed": "seed", "style": "style", "min_side": "min side",
           "backgrounds": "backgrounds", "foregrounds": "foregrounds"}


def stored_parameters(version_dir: str) -> dict | None:
    """The parameters a built dataset stored (see ``Alphablend.parameters``), read from its metadata.json
    without TFDS; None when there is none. Datasets from before ``num_examples`` was stored give the
    example counts their summary records."""
    try:
        with open(os.path.join(version_dir, "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if "num_examples" not in meta:
        examples = (meta.get("summary") or {}).get("examples") or {}
        meta["num_examples"] = {"train": examples.get("train", 0), "test": examples.get("test", 0)}
    return meta


def parameter_diff(stored: dict, requested: dict) -> list[str]:
    """One line per parameter that differs: ``"seed: 0 -> 7"``."""
    lines = []
    for key, label in _LABELS.items():
        a, b = stored.get(key), requested.get(key)
        if key in ("backgrounds", "foregrounds"):
            a = _abs(a)
        if a != b:
            lines.append(f"{label}: {a} -> {b}")
    for split in ("train", "test"):
        a = int((stored.get("num_examples") or {}).get(split, 0))
        b = int(requested["num_examples"][split])
        if a != b:
            lines.append(f"{split} examples: {a} -> {b}")
    return lines


def summary_lines(summary: dict) -> list[str]:
    """Human-readable build summary."""
    lines = [f"task {summary.get('task')}: examples {summary.get('examples')}, "
             f"failed samples {summary.get('failed_samples', 0)}"]
    for name in ("backgrounds", "foregrounds"):
        c = summary.get(name)
        if c:
            lines.append(f"{name} {c['folder']}: {c['files']} files, {c['usable']} usable; "
                         f"converted {dict(c['converted']) or 'none'}; skipped {dict(c['skipped']) or 'none'}")
    return lines

