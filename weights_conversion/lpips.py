"""PyTorch LPIPS (AlexNet, v0.1) checkpoints -> dd_jax's ``lpips-alex-v0.1`` weights.

Inputs (the user supplies them; nothing is downloaded):

* the backbone: torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``;
  keys ``features.{0,3,6,8,10}.{weight,bias}``, the ``classifier.*`` keys are
  ignored), or a whole ``lpips.LPIPS(net="alex").state_dict()`` (keys
  ``net.slice{1..5}.{0,3,6,8,10}.{weight,bias}`` and the heads);
* the linear heads: the ``lpips`` package's ``weights/v0.1/alex.pth`` (keys
  ``lin{0..4}.model.1.weight``, [1, C, 1, 1]; ``model.0`` when the heads were
  built without dropout).

torch is imported only by ``load_torch_file``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import numpy as np

__all__ = ["ALEXNET_CONVS", "convert_state_dicts", "load_torch_file", "convert_files",
           "packaged_heads_path"]

# our conv name -> (torchvision features index, lpips slice)
ALEXNET_CONVS = {"conv1": (0, 1), "conv2": (3, 2), "conv3": (6, 3), "conv4": (8, 4),
                 "conv5": (10, 5)}
NUM_HEADS = 5


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def _backbone_key(sd: Mapping, index: int, slice_: int, param: str) -> str:
    for key in (f"features.{index}.{param}", f"net.slice{slice_}.{index}.{param}"):
        if key in sd:
            return key
    raise KeyError(f"no AlexNet conv features.{index}.{param} (or net.slice{slice_}."
                   f"{index}.{param}) in the backbone checkpoint")


def _head_key(sd: Mapping, k: int) -> str:
    for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"):
        if key in sd:
            return key
    raise KeyError(f"no linear head lin{k}.model.1.weight in the LPIPS heads checkpoint")


def convert_state_dicts(backbone: Mapping, heads: Mapping | None = None) -> dict[str, np.ndarray]:
    """AlexNet (torchvision or lpips naming) + lpips heads -> our flat weights.

    ``heads`` may be omitted when ``backbone`` is a whole LPIPS state dict.
    """
    sd = dict(backbone)
    if heads is not None:
        sd.update(heads)
    if "scaling_layer.shift" in sd:  # a whole LPIPS state dict: check its constants
        from dd_jax.metrics.lpips import SCALE, SHIFT

        shift = _np(sd["scaling_layer.shift"]).reshape(-1)
        scale = _np(sd["scaling_layer.scale"]).reshape(-1)
        if not (np.allclose(shift, SHIFT) and np.allclose(scale, SCALE)):
            raise ValueError(f"unexpected LPIPS ScalingLayer {shift}, {scale} (not v0.1?)")
    out = {}
    for name, (index, slice_) in ALEXNET_CONVS.items():
        w = _np(sd[_backbone_key(sd, index, slice_, "weight")])
        out[f"net.{name}.kernel"] = np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
        out[f"net.{name}.bias"] = _np(sd[_backbone_key(sd, index, slice_, "bias")])
    for k in range(NUM_HEADS):
        w = _np(sd[_head_key(sd, k)])
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            raise ValueError(f"lin{k}: expected a [1, C, 1, 1] head, got {w.shape}")
        out[f"lin{k}.weight"] = w.reshape(-1)
    return out


def load_torch_file(path: str | os.PathLike) -> dict:
    """A state dict saved with ``torch.save`` (needs torch)."""
    import torch  # torch-only: an optional dependency, needed only to read .pth files

    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)}: not a state dict")
    return dict(obj)


def packaged_heads_path() -> str | None:
    """The v0.1 AlexNet heads inside an installed ``lpips`` package, if any.

    Found without importing ``lpips`` (its import needs torchvision).
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", "v0.1", "alex.pth")
        if os.path.isfile(path):
            return path
    return None


def convert_files(backbone_path: str | os.PathLike,
                  heads_path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Convert the backbone file (+ heads file; default: the installed lpips package's)."""
    backbone = load_torch_file(backbone_path)
    heads = None
    if not any(k.startswith("lin0.") for k in backbone):
        heads_path = heads_path or packaged_heads_path()
        if heads_path is None:
            raise FileNotFoundError("no LPIPS heads: pass the lpips package's "
                                    "weights/v0.1/alex.pth")
        heads = load_torch_file(heads_path)
    elif heads_path is not None:
        heads = load_torch_file(heads_path)
    return convert_state_dicts(backbone, heads)
