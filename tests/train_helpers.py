"""Small datasets and configs for training / decomposition tests."""

from __future__ import annotations

import contextlib
import io
import os

from configs import tiny
from dd_jax.data import build

SIZE = 32  # images; the pixel autoencoder (factor 4) and 2x2 packing give 4x4 tokens


def make_dataset(out: str, tasks=("xray", "watermark"), train: int = 12, test: int = 4, seed: int = 0) -> str:
    for task in tasks:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build.main(["--task", task, "--out", str(out), "--train", str(train), "--test", str(test),
                        "--size", str(SIZE), "--seed", str(seed)])
    return str(out)


def small_config(data_dir: str, steps: int = 12, **train):
    c = tiny.get_config()
    p = c.model.params
    p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks = 32, 2, 1, 1
    p.vec_in_dim = p.context_in_dim = 16
    p.axes_dim = (4, 6, 6)
    c.text.length = 3
    c.data.dir = str(data_dir)
    c.data.height = c.data.width = SIZE
    c.data.batch_size = 4
    c.train.steps = steps
    c.train.warmup_steps = 2
    c.train.decay = False
    c.train.learning_rate = 3e-3
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.preview_every = 0
    c.sample.steps = 2
    for k, v in train.items():
        c.train[k] = v
    return c


def config_args(c) -> list[str]:
    """Command-line overrides reproducing `small_config` for `python -m dd_jax.train`."""
    return [
        f"--config={os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'tiny.py')}",
        "--config.model.params.hidden_size=32", "--config.model.params.num_heads=2",
        "--config.model.params.depth=1", "--config.model.params.depth_single_blocks=1",
        "--config.model.params.vec_in_dim=16", "--config.model.params.context_in_dim=16",
        "--config.model.params.axes_dim=(4,6,6)", "--config.text.length=3",
        f"--config.data.dir={c.data.dir}", f"--config.data.height={SIZE}", f"--config.data.width={SIZE}",
        "--config.data.batch_size=4", f"--config.train.steps={c.train.steps}", "--config.train.warmup_steps=2",
        "--config.train.decay=False", "--config.train.learning_rate=0.003", "--config.train.log_every=1",
        f"--config.train.checkpoint_every={c.train.checkpoint_every}", "--config.train.preview_every=0",
        "--config.sample.steps=2",
    ]


def losses(workdir: str) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (the last line logged for a step wins)."""
    import json

    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out
