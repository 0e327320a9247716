"""Encode a dataset's captions once with Flux's T5 + CLIP (the text-embedding cache).

  python -m dd_jax.data.encode_text --data DATA_DIR --encoders /models/flux-dev-jax \
      [--tasks all] [--splits train,test] [--out DATA_DIR/text_cache] [--dtype bfloat16] [--prompt TEXT ...]

DATA_DIR is the --out folder of `python -m dd_jax.data.build`; --encoders the
--output folder of `scripts/convert_flux.py` (its t5/ and clip/ with their
tokenizers). Every unique caption of the chosen tasks and splits is encoded,
plus each task's decomposition prompt (`blend.task_prompt`) and any
--prompt, so training and `python -m dd_jax.decompose` need no T5 on the
accelerator. The input pipeline reads DATA_DIR/text_cache by itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from dd_jax.data import blend, pipeline, text_cache


def dataset_captions(data_dir: str, tasks: str | Sequence[str] = "all",
                     splits: Sequence[str] = ("train", "test")) -> list[str]:
    """Every caption of the built datasets (images are not decoded), in record order, duplicates kept."""
    import tensorflow_datasets as tfds  # TensorFlow is slow to import: only when built datasets are read

    out = []
    for task in pipeline.resolve_tasks(data_dir, tasks):
        path, _ = pipeline.find_dataset_dir(data_dir, task)
        builder = tfds.builder_from_directory(path)
        skip = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
        for split in splits:
            if split not in builder.info.splits:
                continue
            source = builder.as_data_source(split=split, decoders=skip)
            for i in range(len(source)):
                c = source[i]["caption"]
                out.append(c.decode("utf-8") if isinstance(c, bytes) else str(c))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dd_jax.data.encode_text", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="built datasets (python -m dd_jax.data.build --out)")
    ap.add_argument("--encoders", required=True, help="converted pipeline folder with t5/ and clip/")
    ap.add_argument("--tasks", default="all", help="comma-separated subtasks (default: all built ones)")
    ap.add_argument("--splits", default="train,test")
    ap.add_argument("--out", default=None, help="cache folder (default: DATA/text_cache, read by the pipeline)")
    ap.add_argument("--dtype", default="float32", choices=text_cache.DTYPES, help="stored precision")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per encoder call")
    ap.add_argument("--max-length", type=int, default=None, help="T5 tokens (default: the tokenizer folder's)")
    ap.add_argument("--quantize", default="", choices=["", "none", "int8", "fp8", "int4", "fp8_w8a8"],
                    help="T5's block weights stored quantized (qwix, weight-only; docs/quantize.md)")
    ap.add_argument("--prompt", action="append", default=[], help="extra prompt to include (repeatable)")
    args = ap.parse_args(argv)
    tasks = "all" if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    try:
        captions = dataset_captions(args.data, tasks, [s for s in args.splits.split(",") if s])
        encoder = text_cache.TextEncoder(args.encoders, batch_size=args.batch_size, max_length=args.max_length,
                                         quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not captions:
        print(f"error: no examples under {args.data} for tasks {args.tasks} and splits {args.splits}", file=sys.stderr)
        return 2
    prompts = captions + [blend.task_prompt(t) for t in blend.TASKS] + list(args.prompt)
    unique = len(dict.fromkeys(prompts))
    out = args.out or text_cache.default_cache_dir(args.data)
    print(f"encoding {unique} unique prompts ({len(captions)} captions) with {args.encoders}", file=sys.stderr)
    t0 = time.time()
    text_cache.write_cache(out, prompts, encoder, dtype=args.dtype,
                           extra={"data": args.data, "tasks": args.tasks, "splits": args.splits})
    cache = text_cache.TextCache(out)
    print(f"wrote {out}: {len(cache)} prompts, txt {cache.txt_shape}, vec {cache.vec_shape}, {args.dtype} "
          f"({time.time() - t0:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
