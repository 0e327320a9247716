"""scripts/learning_curve.py: every kept checkpoint of a run scored on the same held-out images."""

from __future__ import annotations

import json
import os
import sys

import train_helpers as th

from dd_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import learning_curve  # noqa: E402


def test_curve_scores_each_checkpoint_and_never_replaces_unasked(tmp_path, capsys):
    c = th.small_config("", steps=2, checkpoint_every=1)
    c.data.source, c.data.tasks = "procedural", "all"
    train.train(c, str(tmp_path / "run"))
    args = ["--run", str(tmp_path / "run"), "--output", str(tmp_path / "curve"), "--procedural", "2", "--size", "32",
            "--tasks", "xray", "watermark"]
    assert learning_curve.main(args) == 0
    with open(tmp_path / "curve" / "curve.json") as f:
        got = json.load(f)
    assert [c["step"] for c in got["curve"]] == [1, 2] and got["tasks"] == ["xray", "watermark"]
    for point in got["curve"]:
        assert set(point["ratios"]) == {"xray", "watermark"} and all(v > 0 for v in point["ratios"].values())
        assert abs(point["mean_ratio"] - sum(point["ratios"].values()) / 2) < 1e-9
    assert got["curve"][0]["ratios"] != got["curve"][1]["ratios"]  # each checkpoint's own weights
    assert os.path.getsize(tmp_path / "curve" / "curve.png") > 0
    capsys.readouterr()
    assert learning_curve.main(args) == 2
    assert "exists" in capsys.readouterr().err
