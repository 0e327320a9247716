"""Procedural training data: examples synthesized on access, drawn by index (no build step, no disk).

``ProceduralSource`` is a random-access source (``len`` and ``[i]``) for Grain, like a built data set's:
record ``i`` is made by the synthesizer (`dd_jax.data.synth`) from ``(seed, i)`` alone, so any worker
makes the same record for the same index, a restored Grain iterator (a position) yields exactly what an
uninterrupted one would, and shards (``source[i::n]``) are disjoint. The tasks are mixed round-robin
(record ``i`` belongs to ``tasks[i % len(tasks)]``), or at random by ``weights`` (drawn from ``(seed, i)``).

Records are what a built data set stores (uint8 images, the caption, the task index), so the same
``pipeline.Prepare`` turns them into training examples. The bundled photos of the real-photo evaluation
(``backgrounds.HELD_OUT_PHOTOS``) are never used. The source is picklable: synthesizers are made lazily
in each process that reads it (Grain's worker processes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dd_jax.data import blend, synth

# How many records the source pretends to hold: far more than any run reads (at batch 256, 8M steps).
SIZE = 2**31 - 1
TASK_DRAW = 7  # salt of the per-index task draw (weighted mixing), apart from the synthesizer's own streams


class ProceduralSource:
    """Endless synthesized AlphaBlend records of several tasks at one size (see the module docstring).

    Args:
      tasks: subtask names (``blend.TASKS``).
      height, width: the records' size.
      seed: the data seed; record ``i`` depends on (seed, tasks, weights, split, i) only.
      split: ``train``, or ``test`` / ``validation`` for streams disjoint from the training one.
      style: the synthesizer's style (``synth.STYLES``), or several joined by "+" (taken in turn).
      weights: mixing weights per task (default: round-robin, equal shares).
      backgrounds, foregrounds: the user's folders, as for ``dd_jax.data.build``.
    """

    def __init__(self, tasks: Sequence[str], height: int, width: int, seed: int = 0, split: str = "train",
                 style: str = "classic", weights: Sequence[float] | None = None, backgrounds: str | None = None,
                 foregrounds: str | None = None):
        self.tasks = list(tasks)
        unknown = [t for t in self.tasks if t not in blend.TASK_INDEX]
        if not self.tasks or unknown:
            raise ValueError(f"procedural data: unknown task(s) {unknown or '(none given)'}; choose from "
                             f"{', '.join(blend.TASKS)} or 'all'")
        self.styles = style.split("+")
        if not all(st in synth.STYLES for st in self.styles):
            raise ValueError(f"procedural data: unknown style {style!r}; choose from {', '.join(synth.STYLES)}, "
                             f"or several joined by '+' (e.g. classic+photo: taken in turn)")
        if split not in synth.SPLIT_CODE:
            raise ValueError(f"procedural data: unknown split {split!r}; choose from {', '.join(synth.SPLIT_CODE)}")
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (len(self.tasks),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"procedural data: weights {list(weights)} must be one non-negative number per "
                                 f"task ({len(self.tasks)}), not all 0")
            self.cumulative = np.cumsum(w / w.sum())
        else:
            self.cumulative = None
        self.kwargs = dict(height=int(height), width=int(width), seed=int(seed),
                           backgrounds=backgrounds or None, foregrounds=foregrounds or None)
        self.split = split
        self._synths: dict[tuple[str, str], synth.Synthesizer] = {}

    def __len__(self) -> int:
        return SIZE

    def task_of(self, index: int) -> str:
        if self.cumulative is None:
            return self.tasks[index % len(self.tasks)]
        u = np.random.default_rng([self.kwargs["seed"], TASK_DRAW, synth.SPLIT_CODE[self.split], index]).random()
        return self.tasks[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.tasks) - 1)]

    def style_of(self, index: int) -> str:
        """Several styles are taken in turn, each task getting every style equally often."""
        return self.styles[(index // len(self.tasks)) % len(self.styles)]

    def synthesizer(self, task: str, style: str) -> synth.Synthesizer:
        if (task, style) not in self._synths:
            self._synths[task, style] = synth.Synthesizer(task, style=style, exclude_held_out=True, **self.kwargs)
        return self._synths[task, style]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < SIZE:
            raise IndexError(index)
        task = self.task_of(index)
        # the synthesizer's index is the record's, so no two records share a random stream
        sample = self.synthesizer(task, self.style_of(index)).sample(index, self.split)
        return {"composite": sample.composite, "background": sample.background, "foreground": sample.foreground,
                "caption": sample.caption, "task": blend.TASK_INDEX[task], "dataset": f"procedural/{task}",
                "key": index}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_synths"] = {}  # rebuilt on first use in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"ProceduralSource({self.tasks}, {'+'.join(self.styles)}, {self.kwargs['height']}x"
                f"{self.kwargs['width']}, {self.split})")
