"""Build an AlphaBlend subtask (or a public benchmark: LOGO, CLWD, Flare7K++) as a TFDS dataset.

  python -m dd_jax.data.build --task xray --out DIR --train 5000 --test 300 \
      [--size 512 | --height 512 --width 1024] [--backgrounds DIR] \
      [--foregrounds DIR] [--seed 0] [--workers 2] [--min-side 256]
  python -m dd_jax.data.build --task logo --logo-config high --manual-dir LOGO_ROOT --out DIR
  python -m dd_jax.data.build --task clwd --manual-dir CLWD_ROOT --out DIR
  python -m dd_jax.data.build --task flare7k --flare7k-config real --manual-dir FLARE7KPP_ROOT --out DIR

The dataset lands in DIR/alphablend/<task>/1.0.0 (DIR/logo/<config>/1.0.0)
(DIR/clwd/default/1.0.0, DIR/flare7k/<config>/1.0.0)
as array_record files; read it with ``tfds.builder_from_directory`` or
``tfds.data_source``. TensorFlow is not needed. Progress bars come from TFDS;
a summary (examples written, odd user files converted / skipped) is printed
at the end and stored in the dataset's metadata.

A dataset that already exists is reused when it was built with the same
parameters (size, counts, seed, style, min side, user folders; stored in its
metadata) and refused, with the differences listed, when not: ``--overwrite``
deletes it and builds it again. A killed build leaves nothing that reads as
a dataset. User folders are checked before anything is written: one without
a usable image is refused with what was wrong with its files; a CLWD or
Flare7K++ tree whose folders do not hold the same names is refused (one line),
and a benchmark dataset built from another source folder is not reused.

Exit status: 0 built (or reused), 1 built but some user files were skipped
or some samples failed (see the summary), 2 usage or input error (one line
naming the path and what to do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dd_jax.data import blend

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

BENCHMARKS = ("logo", "clwd", "flare7k")  # public benchmarks read from a folder the user supplies


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dd_jax.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(blend.TASKS) + list(BENCHMARKS))
    p.add_argument("--out", required=True, help="TFDS data_dir to write into")
    p.add_argument("--train", type=int, default=5000, help="training examples")
    p.add_argument("--test", type=int, default=300, help="test examples")
    p.add_argument("--size", type=int, default=None, help="square size (default 512)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--backgrounds", default=None, help="folder of background photos")
    p.add_argument("--foregrounds", default=None, help="folder of RGBA foreground layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="classic", choices=["classic", "photo"],
                   help="classic: the paper's layers scaled to the image; photo: overlays at a photo's own "
                        "pixel scale over near-native photo views (for tiled, native-resolution models)")
    p.add_argument("--workers", type=int, default=0, help="synthesis processes (0: in-process)")
    p.add_argument("--min-side", type=int, default=None,
                   help="skip background photos with a shorter side (default: half the output's)")
    p.add_argument("--logo-config", default="high", choices=["high", "mid", "gray"])
    p.add_argument("--flare7k-config", default="real", choices=["real", "synthetic"],
                   help="Flare7K++ test set: test_data/real or test_data/synthetic")
    p.add_argument("--manual-dir", default=None,
                   help="benchmark folder as published: LOGO root (holding 10khigh/ ...), CLWD (train/, test/), "
                        "Flare7K++ (test_data/)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing dataset of this task (OUT/alphablend/<task>/<version>) and build it "
                        "again; without it, a dataset built with other parameters is refused")
    args = p.parse_args(argv)
    for flag in ("train", "test", "workers", "size", "height", "width", "min_side"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative (got {value})")
    if args.task not in BENCHMARKS and args.train == 0 and args.test == 0:
        p.error("--train and --test are both 0: nothing to build")
    for flag in ("backgrounds", "foregrounds", "manual_dir"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            p.error(f"--{flag.replace('_', '-')} {path}: not a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: not a folder")
    if args.size is not None and (args.height or args.width):
        p.error("give --size or --height/--width, not both")
    args.height = args.height or args.size or 512
    args.width = args.width or args.size or 512
    if args.height < 16 or args.width < 16:
        p.error("sizes below 16 px are not supported")
    if args.task in BENCHMARKS and not args.manual_dir:
        p.error(f"--task {args.task} needs --manual-dir (the benchmark's folder, supplied by you)")
    return args


class InputError(ValueError):
    """A build refused before anything was written; the text says why and what to do."""


def check_existing(builder: tfds.core.DatasetBuilder, args: argparse.Namespace) -> bool:
    """Whether a complete dataset with the requested parameters is already there (True: reuse it).

    Raises InputError for a folder in the dataset's place that TFDS did not write, and (without
    --overwrite) for a dataset built with other parameters, listing each difference."""
    from dd_jax.data import alphablend, pipeline  # pylint: disable=g-import-not-at-top

    path = os.fspath(builder.data_path)
    if not os.path.lexists(path):
        return False
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise InputError(f"{path} exists but is not a dataset (no dataset_info.json); move it away or choose "
                         "another --out")
    if args.overwrite:
        return False
    try:
        pipeline.check_features(path)  # what a reader would refuse is not reused
    except ValueError as e:
        raise InputError(f"{e} (or pass --overwrite)") from e
    if args.task == "logo":
        return True
    if args.task in BENCHMARKS:
        from dd_jax.data import public  # pylint: disable=g-import-not-at-top

        was, now = public.stored_source(path), builder.parameters()["source"]
        if was != now:
            raise InputError(f"{path} was built from another folder ({was} -> {now}); pass --overwrite to delete "
                             "it and build again, or choose another --out")
        return True
    stored = alphablend.stored_parameters(path)
    diff = ["metadata.json missing or unreadable"] if stored is None else \
        alphablend.parameter_diff(stored, builder.parameters())
    if diff:
        raise InputError("\n".join([f"{path} was built with other parameters (stored -> requested):"]
                                    + [f"  {d}" for d in diff]
                                    + ["pass --overwrite to delete it and build again, or choose another --out"]))
    return True


def build(args: argparse.Namespace) -> tfds.core.DatasetBuilder:
    """Builds and returns the (prepared) TFDS builder. Raises InputError (nothing written) for refusals."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from dd_jax.data import alphablend, backgrounds, clwd, flare7k, logo, public  # pylint: disable=g-import-not-at-top

    if args.task == "logo":
        builder = logo.Logo(config=args.logo_config, data_dir=args.out, file_format="array_record")
    elif args.task == "clwd":
        builder = clwd.Clwd(config="default", source=args.manual_dir, data_dir=args.out, file_format="array_record")
    elif args.task == "flare7k":
        builder = flare7k.Flare7k(config=args.flare7k_config, source=args.manual_dir, data_dir=args.out,
                                  file_format="array_record")
    else:
        builder = alphablend.Alphablend(
            config=args.task, data_dir=args.out, file_format="array_record",
            height=args.height, width=args.width, num_train=args.train, num_test=args.test,
            backgrounds=args.backgrounds, foregrounds=args.foregrounds, seed=args.seed,
            workers=args.workers, min_side=args.min_side, style=args.style)
    if check_existing(builder, args):
        print(f"{builder.data_path} is already built with these parameters: reusing it "
              "(--overwrite builds it again)")
        builder.reused = True
        return builder
    if args.task in ("clwd", "flare7k"):
        try:
            builder.check_source()  # a malformed tree: refused before TFDS writes
        except public.SourceError as e:
            raise InputError(str(e)) from e
    elif args.task != "logo":
        try:
            builder.prepare_sources()  # a user folder without a usable image: refused before TFDS writes
        except backgrounds.SourceError as e:
            raise InputError(str(e)) from e
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if args.overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    cfg = tfds.download.DownloadConfig(manual_dir=args.manual_dir, download_mode=mode,
                                       try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=cfg)
    except alphablend.BuildError as e:
        raise InputError(str(e)) from e
    return builder


def skipped_anything(summary: dict) -> bool:
    """Whether the build skipped user files or failed samples (exit status 1)."""
    if summary.get("failed_samples") or any(summary.get("skipped", {}).values()):
        return True
    return any(any((summary.get(name) or {}).get("skipped", {}).values()) for name in ("backgrounds", "foregrounds"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        builder = build(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = dict(builder.info.metadata.get("summary", {}))
    if not getattr(builder, "reused", False):
        print(f"\nwrote {builder.data_dir} in {time.time() - t0:.1f}s")
    if args.task in BENCHMARKS:
        print(json.dumps(summary, indent=1))
    else:
        from dd_jax.data import alphablend  # pylint: disable=g-import-not-at-top

        print("\n".join(alphablend.summary_lines(summary)))
    sys.stdout.flush()
    return 1 if skipped_anything(summary) else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
