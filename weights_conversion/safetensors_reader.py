"""Lazy, tensor-at-a-time reading of safetensors checkpoints without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets), then the raw tensor bytes. We parse the
headers only, and read one tensor's bytes when asked, so the memory a
conversion needs follows the largest tensor rather than the checkpoint.
bfloat16 tensors are read as `ml_dtypes.bfloat16` (no float32 detour).

Sources accepted by `SafetensorsReader.open`:
- a single `.safetensors` file;
- a folder holding a `*.safetensors.index.json` (sharded, hub layout);
- a folder holding one or more `.safetensors` files (all are read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (bad file, key or shape)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: str
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: implausible safetensors header length {n}")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return header, 8 + n


class SafetensorsReader:
    """Name -> tensor access over one or several safetensors files."""

    def __init__(self, files: list[str]):
        if not files:
            raise CheckpointError("no .safetensors files given")
        self.files = list(files)
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for path in self.files:
            header, data_start = _read_header(path)
            size = os.path.getsize(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, entry in header.items():
                if name in self._infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._infos[name].path} and {path}")
                if entry["dtype"] not in _DTYPES:
                    raise CheckpointError(f"tensor {name!r}: unsupported dtype {entry['dtype']}")
                begin, end = entry["data_offsets"]
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or data_start + end > size:
                    raise CheckpointError(f"tensor {name!r} in {path}: byte range does not match its shape/dtype "
                                          "(truncated file?)")
                self._infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)

    @classmethod
    def open(cls, source: str) -> SafetensorsReader:
        source = os.fspath(source)
        if os.path.isfile(source):
            return cls([source])
        if not os.path.isdir(source):
            raise CheckpointError(f"{source}: no such file or folder")
        indexes = sorted(f for f in os.listdir(source) if f.endswith(".safetensors.index.json"))
        if indexes:
            with open(os.path.join(source, indexes[0])) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(source, v) for v in weight_map.values()})
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise CheckpointError(f"{indexes[0]} names shard(s) that are missing: {missing}")
            return cls(files)
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{source}: no .safetensors files in this folder")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._infos.items()}

    def read(self, name: str, dtype: npt.DTypeLike | None = None) -> np.ndarray:
        """Reads one tensor (a fresh array, not a mapping of the file)."""
        info = self._infos[name]
        count = int(np.prod(info.shape, dtype=np.int64))
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            arr = np.fromfile(f, dtype=info.dtype, count=count).reshape(info.shape)
        if dtype is not None and arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)
