"""Training without a build step and within a budget: procedural data, train.max_minutes, the default-model
recipe (configs/default_gpu.py) on the CPU, run folders outside the checkout, the export folder checked first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import train_helpers as th

from dd_jax import checkpoints, inference, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def procedural_config(steps: int, **kw):
    c = th.small_config("", steps=steps, **kw)
    c.data.source, c.data.tasks, c.data.style = "procedural", "all", "classic+photo"
    return c


def test_budget_keeps_room_for_a_step_a_checkpoint_and_the_export():
    b = train.Budget(1.0, start=1000.0)  # deadline 1060
    assert not b.spent(now=1000.0 + 60 - 2 * 2 * b.SAVE_GUESS - 1)
    assert b.spent(now=1000.0 + 60 - 2 * 2 * b.SAVE_GUESS + 1)
    b.note_save(1.0)
    b.note_step(2.0)
    assert b.step_seconds == 2.0 and not b.spent(now=1051.9) and b.spent(now=1052.1)  # reserve 2*(2+2*1) = 8 s
    assert not train.Budget(0.0, start=0.0).spent(now=1e12)  # 0: no budget
    with pytest.raises(checkpoints.RunError, match="max_minutes"):
        train.Budget(-1.0)


def test_a_spent_budget_stops_saves_and_exports_and_the_rerun_continues(tmp_path):
    c = procedural_config(steps=6, max_minutes=1e-6)  # spent already: this process started long ago
    summary = train.train(c, str(tmp_path))
    assert summary["interrupted"] == "max_minutes" and summary["step"] == 1
    assert checkpoints.Checkpoints(str(tmp_path / "checkpoints"), 3).latest() == 1
    assert checkpoints.export_step(summary["export"]) == 1  # a usable model, named with its step
    c.train.max_minutes = 0.0
    summary = train.train(c, str(tmp_path))
    assert summary["start_step"] == 1 and summary["step"] == 6 and "interrupted" not in summary
    assert checkpoints.export_step(summary["export"]) == 6  # the run's own export is replaced


def test_an_export_folder_of_other_files_is_refused_before_any_step(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoints.RunError, match="not a dd_jax model folder.*where this run exports"):
        train.train(procedural_config(steps=2), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["export"] and (tmp_path / "export" / "notes.txt").read_text() == "mine"


def test_procedural_tasks_and_style_are_checked_first(tmp_path):
    c = procedural_config(steps=2)
    c.data.style = "sketch"
    with pytest.raises(checkpoints.RunError, match="unknown style"):
        train.train(c, str(tmp_path / "run"))
    c = procedural_config(steps=2)
    c.data.source = "web"
    with pytest.raises(checkpoints.RunError, match="data.source='web'"):
        train.train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_default_workdir_is_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("DD_JAX_HOME", str(tmp_path / "home"))
    assert checkpoints.default_workdir("configs/default_cpu.py") == str(tmp_path / "home" / "runs" / "default_cpu")
    assert checkpoints.default_workdir("configs/gpu_h20.py:xray").endswith(os.path.join("runs", "gpu_h20-xray"))
    monkeypatch.delenv("DD_JAX_HOME")
    assert checkpoints.home() == os.path.expanduser(os.path.join("~", ".cache", "dd_jax"))


def test_default_gpu_recipe_runs_on_the_cpu_and_packs_what_a_window_brings_back(tmp_path):
    """scripts/gpu_default_model.sh with configs/default_gpu.py as written (the shipped architecture, warm-started
    from the shipped model, procedural data through a Grain worker process), a few steps: the model comes back
    as one archive with its task head, beside the run's metrics and config."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, RUN=str(tmp_path / "run"), HEAD_IMAGES="1")
    out = tmp_path / "out"
    args = ["bash", f"{REPO}/scripts/gpu_default_model.sh", str(out), "--config.train.steps=3",
            "--config.train.warmup_steps=1", "--config.data.batch_size=2", "--config.data.worker_count=1",
            "--config.train.log_every=1"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model.tgz", "train.log"]
    log = (out / "train.log").read_text()
    assert "starting from the parameters of" in log and "wrote " in log
    with tarfile.open(out / "model.tgz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    model = str(tmp_path / "back" / "export")
    assert checkpoints.export_step(model) == 3 and inference.load_task_head(model) is not None
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["data"]["source"] == "procedural" and saved["train"]["max_minutes"] == 8.0
    assert sorted(th.losses(str(tmp_path / "run"))) == [1, 2, 3]


def test_without_grain_training_says_so_in_one_line_and_without_tensorboardx_it_goes_on(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "grain", None)  # a GPU host without the carried wheels
    with pytest.raises(checkpoints.RunError, match=r"^training \(python -m dd_jax.train\) needs grain: "
                                                   r"pip install grain==0.2.18$"):
        train.train(procedural_config(steps=2), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert train._tb_writer(str(tmp_path)) is None
    assert "TensorBoard output needs tensorboardX: pip install tensorboardX==2.6.4; writing metrics.jsonl only" \
        in capsys.readouterr().err


@pytest.mark.parametrize("text, args, want", [
    (None, ["--config=configs/tinny.py"], r"^--config configs/tinny.py: no such file or folder; did you mean "
                                          r"configs/tiny.py\?$"),
    ("def get_config(:\n", [], r"syntax error"),
    ("x = 1\n", [], r"no get_config\(\) function"),
    ("def get_config():\n    raise RuntimeError('boom')\n", [], r"get_config\(\) raised RuntimeError: boom"),
    (None, ["--config=configs/tiny.py", "--config.train.stpes=3"],
     r"^--config.train.stpes: the config has no field 'train.stpes'; did you mean train.steps\?"),
    (None, ["--config", "configs/tiny.py", "--config.trian.steps=3"], r"no field 'trian'; did you mean train\?"),
    (None, ["--config=configs/tiny.py", "--config.model.params.hidden_size=64", "--config.train.steps=2"], None),
])
def test_config_arguments_are_checked_in_one_line(tmp_path, monkeypatch, text, args, want):
    """What absl reported as a traceback or a garbled line: a missing, broken or misspelled config file or field."""
    monkeypatch.chdir(REPO)
    if text is not None:
        (tmp_path / "c.py").write_text(text)
        args = [f"--config={tmp_path / 'c.py'}"]
    problem = train.check_config_args(["dd_jax.train", *args])
    assert problem is None if want is None else re.search(want, problem), problem
