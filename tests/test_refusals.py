"""Issue 25, round 2: inputs that used to lose data or memory are refused first, in one line, with exit status 2.

A config of another architecture than the model's (it built a 12B flux-dev, then ran out of memory), models with
NaN weights (black layers, exit 0), inputs too large for the memory there is, and the user errors of the CLIs.
"""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

from dd_jax import checkpoints, decompose, evaluate, system as system_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATERMARK = os.path.join(REPO, "configs", "watermark.py")  # flux-dev + LoRA: not the shipped tiny model


def run_main(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def no_build(monkeypatch):
    """Building a model fails the test: the checks under test must come before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(system_lib, "build", refuse)


def error_line(err: str) -> str:
    lines = [s for s in err.strip().splitlines() if s.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ 1. a config of another architecture
def test_decompose_refuses_a_config_of_another_architecture_before_building(tmp_path, no_build):
    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    rc, _, err = run_main(decompose.main, ["--input", img, "--output", tmp_path / "out", "--config", WATERMARK])
    line = error_line(err)
    assert rc == 2, err
    assert "model.preset: 'tiny' -> 'flux-dev'" in line and "text.kind" in line and WATERMARK in line, line
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_config_of_another_architecture_before_building(tmp_path, no_build):
    rc, _, err = run_main(evaluate.main, ["--data", tmp_path / "data", "--output", tmp_path / "report",
                                          "--config", WATERMARK])
    assert rc == 2 and "model.preset: 'tiny' -> 'flux-dev'" in error_line(err), err


def test_a_run_is_checked_against_its_config_json(tmp_path, no_build):
    from dd_jax import config as config_lib

    meta = checkpoints.read_model_meta(checkpoints.DEFAULT_MODEL)
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoints.CONFIG_FILE).write_text(json.dumps(meta["config"]))
    with pytest.raises(checkpoints.RunError, match="model.preset: 'tiny' -> 'flux-dev'"):
        checkpoints.load_trained(str(run), config_lib.load_config_file(WATERMARK))
    # the same architecture with other settings (data, steps) passes the check and goes on to load
    same = config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    same.sample.steps = 7
    with pytest.raises(AssertionError, match="was built"):
        checkpoints.load_trained(str(run), same)
