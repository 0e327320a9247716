"""Fitting the automatic task choice's head (python -m dd_jax.inference) on procedural data: no build step,
no Grain."""

from __future__ import annotations

import shutil
import sys

from dd_jax import checkpoints, inference


def test_task_head_fits_on_procedural_images_without_grain(monkeypatch, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(checkpoints.DEFAULT_MODEL, model, ignore=shutil.ignore_patterns(inference.TASK_HEAD_FILE))
    monkeypatch.setitem(sys.modules, "grain", None)  # procedural data needs neither Grain nor TFDS
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    assert inference._fit_main(["--procedural", "2", "--size", "32", "--checkpoint", str(model)]) == 0
    err = capsys.readouterr().err
    assert "eval data (validation stream), head: accuracy" in err
    head = inference.load_task_head(str(model))
    assert head is not None and "procedural classic+photo 32px" in head.note and head.mean.shape == (6, 2)
    assert inference._fit_main(["--procedural", "2", "--checkpoint", str(model)]) == 2  # never replaced unasked
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
