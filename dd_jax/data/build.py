"""Build an AlphaBlend subtask (or the LOGO benchmark) as a TFDS dataset.

  python -m dd_jax.data.build --task xray --out DIR --train 5000 --test 300 \
      [--size 512 | --height 512 --width 1024] [--backgrounds DIR] \
      [--foregrounds DIR] [--seed 0] [--workers 2] [--min-side 256]
  python -m dd_jax.data.build --task logo --logo-config high --manual-dir LOGO_ROOT --out DIR

The dataset lands in DIR/alphablend/<task>/1.0.0 (DIR/logo/<config>/1.0.0)
as array_record files; read it with ``tfds.builder_from_directory`` or
``tfds.data_source``. TensorFlow is not needed. Progress bars come from TFDS;
a summary (examples written, odd user files converted / skipped) is printed
at the end and stored in the dataset's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dd_jax.data import blend


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dd_jax.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(blend.TASKS) + ["logo"])
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
    p.add_argument("--manual-dir", default=None, help="LOGO root (holding 10khigh/ ...)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = p.parse_args(argv)
    if args.size is not None and (args.height or args.width):
        p.error("give --size or --height/--width, not both")
    args.height = args.height or args.size or 512
    args.width = args.width or args.size or 512
    if args.height < 16 or args.width < 16:
        p.error("sizes below 16 px are not supported")
    if args.task == "logo" and not args.manual_dir:
        p.error("--task logo needs --manual-dir")
    return args


def build(args: argparse.Namespace):
    """Builds and returns the (prepared) TFDS builder."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from dd_jax.data import alphablend, logo  # pylint: disable=g-import-not-at-top

    if args.task == "logo":
        builder = logo.Logo(config=args.logo_config, data_dir=args.out, file_format="array_record")
    else:
        builder = alphablend.Alphablend(
            config=args.task, data_dir=args.out, file_format="array_record",
            height=args.height, width=args.width, num_train=args.train, num_test=args.test,
            backgrounds=args.backgrounds, foregrounds=args.foregrounds, seed=args.seed,
            workers=args.workers, min_side=args.min_side, style=args.style)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if args.overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    cfg = tfds.download.DownloadConfig(manual_dir=args.manual_dir, download_mode=mode,
                                       try_download_gcs=False)
    builder.download_and_prepare(download_config=cfg)
    return builder


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    builder = build(args)
    summary = dict(builder.info.metadata.get("summary", {}))
    print(f"\nwrote {builder.data_dir} in {time.time() - t0:.1f}s")
    if args.task == "logo":
        print(json.dumps(summary, indent=1))
    else:
        from dd_jax.data import alphablend  # pylint: disable=g-import-not-at-top

        print("\n".join(alphablend.summary_lines(summary)))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
