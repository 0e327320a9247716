#!/usr/bin/env python
"""Writes the README's sample inputs: one synthetic composite per subtask, from a seed never used for training.

    python scripts/make_samples.py [--out docs/samples] [--size 192] [--seed 7]

Each `<task>_1.png` is a composite built by `python -m dd_jax.data.build`
(the file name tells `dd_jax.decompose` which blend law to invert);
`truth/<task>_1_background.png` is its true background, for comparison.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/samples")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    import tensorflow_datasets as tfds

    from dd_jax.data import blend, build

    os.makedirs(os.path.join(args.out, "truth"), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for task in blend.TASKS:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                build.main(["--task", task, "--out", tmp, "--train", "0", "--test", "1", "--size", str(args.size),
                            "--seed", str(args.seed)])
            builder = tfds.builder_from_directory(os.path.join(tmp, "alphablend", task, "1.0.0"))
            ex = builder.as_data_source(split="test")[0]
            for key, name in (("composite", f"{task}_1.png"), ("background", f"truth/{task}_1_background.png")):
                Image.fromarray(np.asarray(ex[key], np.uint8)).save(os.path.join(args.out, name))
            print(f"wrote {task}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
