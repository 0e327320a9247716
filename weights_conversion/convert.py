"""Checkpoint conversion entry point (`scripts/convert_flux.py`).

    python scripts/convert_flux.py --source SRC --output OUT [--dtype float32|bfloat16]
                                   [--components transformer,vae,t5,clip]

SRC is a diffusers Flux pipeline folder (`model_index.json`, `transformer/`,
`vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`):
OUT then receives one dd_jax model folder per component, `OUT/transformer`,
`OUT/vae`, `OUT/t5`, `OUT/clip` (each text encoder with its tokenizer), all
the pipeline holds unless `--components` names fewer. SRC can also be a
single component: a BFL single-file transformer (`flux1-dev.safetensors`), a
diffusers `transformer/` folder (the default component), or, with
`--components vae|t5|clip`, an autoencoder, T5 or CLIP folder (or BFL's
`ae.safetensors`); OUT is then that component's folder. Checkpoint names
and shapes are checked against the models before any data is read; data is
then streamed group by group into a temporary folder that is renamed to its
final name at the end, so a killed conversion leaves nothing that reads as
a model folder (only a hidden `.NAME.partial-*` sibling to delete).
`--overwrite` replaces only model folders the converter wrote (marker:
`dd_jax_model.json`) or empty folders; anything else is refused. A tensor
holding NaN or inf values (a damaged download; a value beyond `--dtype`'s
range) stops the conversion, naming it, unless `--allow-non-finite` is given.

Exit status: 0 converted, 2 usage or input error (one line naming the path).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from dd_jax import cli
from weights_conversion import pipeline
from weights_conversion.common import DTYPES
from weights_conversion.safetensors_reader import CheckpointError


def axes_dims(text: str) -> tuple[int, ...]:
    """`--axes-dim 16,56,56` -> (16, 56, 56): positive integers, comma-separated."""
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 or d % 2 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated even positive integers, e.g. 16,56,56")
    return dims


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="scripts/convert_flux.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True,
                    help="diffusers pipeline folder, or one component: BFL .safetensors file or diffusers folder")
    ap.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--components", default=None,
                    help="comma-separated subset of transformer,vae,t5,clip (default: all a pipeline folder holds; "
                         "transformer for a single checkpoint)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: the source's)")
    ap.add_argument("--axes-dim", type=axes_dims, default=None,
                    help="RoPE axes dims, e.g. 16,56,56 (BFL files do not store them; default inferred)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT (OUT/<component> for a pipeline) if it is a model folder this converter "
                         "wrote (it holds dd_jax_model.json) or empty; any other folder or file is refused, "
                         "never deleted")
    ap.add_argument("--allow-non-finite", action="store_true",
                    help="convert tensors holding NaN or inf values as they are, with a warning per tensor (without "
                         "it such a checkpoint is refused, naming the tensor: a model with them writes black layers)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        components = pipeline.parse_components(args.components)
    except ValueError as e:
        ap.error(str(e))
    if not os.path.exists(args.source):
        print(f"error: {cli.not_found(args.source, '--source')}", file=sys.stderr)
        return 2
    if not pipeline.is_pipeline(args.source) and components and len(components) != 1:
        ap.error(f"{args.source} is a single checkpoint: --components takes one name here")
    t0 = time.time()
    try:
        if pipeline.is_pipeline(args.source):
            outs = pipeline.convert_pipeline(args.source, args.output, components, args.dtype,
                                             overwrite=args.overwrite, axes_dim=args.axes_dim,
                                             progress=not args.quiet, allow_non_finite=args.allow_non_finite)
            out = ", ".join(outs.values())
        else:
            out = pipeline.convert_component((components or ["transformer"])[0], args.source, args.output, args.dtype,
                                             overwrite=args.overwrite, axes_dim=args.axes_dim,
                                             progress=not args.quiet, allow_non_finite=args.allow_non_finite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output under a file, read-only, full disk: nothing complete was left behind
        print(f"error: {e.filename or args.output}: {e.strerror or e}; nothing was written under its final name",
              file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
