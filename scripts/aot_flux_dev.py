#!/usr/bin/env python
"""Compiles the paper's flux-dev LoRA training step ahead of time on abstract shapes and prints its cost.

    python scripts/aot_flux_dev.py [--config configs/watermark.py --config configs/xray.py] [--scan] [--remat dots]

No weights are read or allocated: the model (flux-dev + LoRA r128), the Flux
VAE and the optimizer exist only as shapes. For each config (default: the
512x512 and 512x1024 subtask configs) it prints the token count, parameter
counts, XLA's FLOPs per step, an analytic 6*N*tokens estimate beside it, and
XLA's memory analysis of the compiled step for this backend.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None, help="config file(s)")
    ap.add_argument("--scan", action="store_true", help="scanned block layout (compiles faster; XLA may count "
                                                         "the loop body once, so FLOPs are for unscanned only)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--txt-len", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true", help="lower only (cost from the unoptimised HLO)")
    args = ap.parse_args(argv)

    from dd_jax import aot, config as config_lib

    paths = args.config or [os.path.join(REPO, "configs", "watermark.py"), os.path.join(REPO, "configs", "xray.py")]
    for path in paths:
        config = config_lib.load_config_file(path)
        config.model.scan_layers = args.scan
        config.model.remat = args.remat
        t0 = time.time()
        r = aot.compile_train_step(config, txt_len=args.txt_len, compile=not args.no_compile)
        d = config.data
        analytic = 6 * r.total_params * r.tokens * d.batch_size
        print(f"{os.path.basename(path)}: {d.height}x{d.width}, batch {d.batch_size}, {r.tokens} tokens "
              f"(3 image layers + {args.txt_len} text), {r.total_params / 1e9:.2f}B params "
              f"({r.trainable_params / 1e6:.1f}M trainable LoRA), {'compiled' if not args.no_compile else 'lowered'} "
              f"in {time.time() - t0:.0f}s")
        if r.flops is not None:
            print(f"  XLA FLOPs per step: {r.flops / 1e12:.2f} TFLOP  "
                  f"(6*N*tokens estimate: {analytic / 1e12:.2f} TFLOP)")
        if r.memory is not None:
            m = r.memory
            gib = lambda x: x / 2**30
            print(f"  memory (this backend): arguments {gib(m.argument_size_in_bytes):.1f} GiB, "
                  f"temporaries {gib(m.temp_size_in_bytes):.1f} GiB, outputs {gib(m.output_size_in_bytes):.1f} GiB "
                  f"(aliased {gib(m.alias_size_in_bytes):.1f} GiB)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
