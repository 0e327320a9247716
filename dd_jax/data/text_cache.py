"""Flux text conditioning for training and decomposition: T5 + CLIP, encoded once and cached.

Flux conditions on the T5 encoder's last hidden state (`txt` [L, 4096], L =
512 for dev / Kontext, 256 for schnell, padding included) and CLIP-L's
pooled output (`vec` [768]). Running T5-XXL next to the transformer costs
~9 GB of accelerator memory, so captions are encoded once, up front:

    python -m dd_jax.data.encode_text --data DATA_DIR --encoders /models/flux-dev-jax

writes DATA_DIR/text_cache/ (one row per unique caption; the datasets'
captions repeat a lot):

    index.json   {"format", "captions": [...], "dtype", "txt_shape", "vec_shape", "encoders", ...}
    txt.npy      [N, L, C]   T5 last hidden states (bfloat16 stored as uint16 bits)
    vec.npy      [N, P]      CLIP pooled outputs

`TextCache` reads rows lazily (memory-mapped; the file may be far larger
than RAM); the input pipeline attaches them to every example by caption
(`dd_jax.data.pipeline.make_pipeline`, which picks up DATA_DIR/text_cache
by itself). `TextEncoder` is the online alternative: it encodes prompts
with the converted encoders on demand (memoized), in the input pipeline
(`make_pipeline(text_encoders=...)`) or at decomposition time for a
task's prompt (`dd_jax.data.blend.task_prompt`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from flax import nnx

from dd_jax.models import clip, t5, tokenizers

if TYPE_CHECKING:
    import ml_collections

FORMAT = "dd_jax.text_cache/1"
CACHE_DIR = "text_cache"
INDEX_FILE = "index.json"
DTYPES = ("float32", "bfloat16", "float16")


def default_cache_dir(data_dir: str) -> str:
    return os.path.join(os.fspath(data_dir), CACHE_DIR)


# ------------------------------------------------------------------ encoders
def find_encoders(path: str) -> tuple[str, str]:
    """(t5 folder, clip folder) of a converted pipeline folder (scripts/convert_flux.py's --output)."""
    path = os.fspath(path)
    t5_dir, clip_dir = os.path.join(path, "t5"), os.path.join(path, "clip")
    missing = [d for d in (t5_dir, clip_dir) if not os.path.isdir(d)]
    if missing:
        raise FileNotFoundError(f"{path}: no converted text encoder folder(s) {missing}; convert them with "
                                f"`python scripts/convert_flux.py --source PIPELINE --output {path} "
                                f"--components t5,clip`")
    return t5_dir, clip_dir


class TextEncoder:
    """Tokenizers + T5 + CLIP from a converted pipeline folder; `encode(prompts) -> (txt, vec)` float32 numpy.

    Prompts go through in fixed-size batches (one compilation); results are
    memoized by prompt. Loading is lazy, so the object pickles cheaply
    (Grain worker processes load their own copy). `quantize` ("int8", "fp8",
    "int4"; "" none) stores T5's block weights quantized as they are read
    (`dd_jax.quantize.load_t5`); CLIP, small, stays as it is.
    """

    def __init__(self, path: str, *, batch_size: int = 8, dtype: str | None = None, max_length: int | None = None,
                 memo: int = 4096, quantize: str = ""):
        from dd_jax import quantize as quantize_lib

        self.path = os.fspath(path)
        find_encoders(self.path)  # fail early, with the fix in the message
        self.batch_size, self.dtype, self.max_length, self.memo = int(batch_size), dtype, max_length, int(memo)
        self.quantize = quantize_lib.check(quantize)
        self._loaded = None
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None, "_memo": {}}

    def _load(self):
        if self._loaded is None:
            t5_dir, clip_dir = find_encoders(self.path)
            if self.quantize:
                from dd_jax import quantize as quantize_lib

                t5_model = quantize_lib.load_t5(t5_dir, self.quantize, self.dtype)
            else:
                t5_model = t5.load(t5_dir, self.dtype)
            clip_model = clip.load(clip_dir, self.dtype)

            @nnx.jit
            def run(t5_m, clip_m, t5_ids, clip_ids):
                return t5_m(t5_ids), clip_m(clip_ids)[1]

            self._loaded = (tokenizers.load_t5_tokenizer(t5_dir, self.max_length),
                            tokenizers.load_clip_tokenizer(clip_dir), t5_model, clip_model, run)
        return self._loaded

    @property
    def t5_length(self) -> int:
        return self._load()[0].max_length

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts [N] -> txt float32 [N, L, C], vec float32 [N, P]."""
        prompts = [str(p) for p in prompts]
        todo = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        if todo:
            t5_tok, clip_tok, t5_model, clip_model, run = self._load()
            for s in range(0, len(todo), self.batch_size):
                chunk = todo[s:s + self.batch_size]
                padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
                txt, vec = run(t5_model, clip_model, t5_tok(padded).input_ids, clip_tok(padded).input_ids)
                txt, vec = np.asarray(txt, np.float32), np.asarray(vec, np.float32)
                if len(self._memo) + len(chunk) > self.memo:
                    self._memo.clear()
                for i, p in enumerate(chunk):
                    self._memo[p] = (txt[i], vec[i])
        return (np.stack([self._memo[p][0] for p in prompts]), np.stack([self._memo[p][1] for p in prompts]))


# ------------------------------------------------------------------ the cache
def _to_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.asarray(x, ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x, dtype)


def _from_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.asarray(x).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(x, np.float32)


def write_cache(out_dir: str, captions: Iterable[str], encoder: TextEncoder, *, dtype: str = "float32",
                extra: dict | None = None, progress: bool = True) -> str:
    """Encodes the unique `captions` and writes a cache folder (replacing any cache there)."""
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: choose from {DTYPES}")
    captions = list(dict.fromkeys(str(c) for c in captions))
    if not captions:
        raise ValueError("no captions to encode")
    out_dir = os.fspath(out_dir)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    txt_arr = vec_arr = None
    step = encoder.batch_size * 16
    for s in range(0, len(captions), step):
        txt, vec = encoder.encode(captions[s:s + step])
        if txt_arr is None:  # memory-mapped outputs: the cache never has to fit in RAM
            st, n = _to_stored(txt[:1], dtype).dtype, len(captions)
            txt_arr = np.lib.format.open_memmap(os.path.join(tmp, "txt.npy"), "w+", st, (n,) + txt.shape[1:])
            vec_arr = np.lib.format.open_memmap(os.path.join(tmp, "vec.npy"), "w+", st, (n,) + vec.shape[1:])
        txt_arr[s:s + len(txt)] = _to_stored(txt, dtype)
        vec_arr[s:s + len(vec)] = _to_stored(vec, dtype)
        encoder._memo.clear()  # pylint: disable=protected-access
        if progress:
            print(f"  encoded {min(s + step, len(captions))}/{len(captions)} captions", file=sys.stderr, flush=True)
    txt_arr.flush()
    vec_arr.flush()
    index = {"format": FORMAT, "dtype": dtype, "txt_shape": list(txt_arr.shape[1:]),
             "vec_shape": list(vec_arr.shape[1:]), "encoders": os.path.abspath(encoder.path),
             "t5_length": int(txt_arr.shape[1]), "captions": captions, **(extra or {})}
    del txt_arr, vec_arr
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


class TextCache:
    """Random access to a cache folder by caption: `cache[caption] -> (txt [L, C], vec [P])` float32."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index_file = os.path.join(self.path, INDEX_FILE)
        if not os.path.isfile(index_file):
            raise FileNotFoundError(f"{self.path}: not a text-embedding cache (no {INDEX_FILE}); write one with "
                                    "`python -m dd_jax.data.encode_text --data DATA_DIR --encoders CONVERTED_DIR`")
        with open(index_file) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unknown text cache format {index.get('format')!r} (expected {FORMAT})")
        self.dtype = index["dtype"]
        self.txt_shape, self.vec_shape = tuple(index["txt_shape"]), tuple(index["vec_shape"])
        self.encoders = index.get("encoders", "")
        self.rows = {c: i for i, c in enumerate(index["captions"])}
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, caption: str) -> bool:
        return caption in self.rows

    def _open(self):
        if self._arrays is None:
            self._arrays = tuple(np.load(os.path.join(self.path, f), mmap_mode="r") for f in ("txt.npy", "vec.npy"))
        return self._arrays

    def __getitem__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows.get(caption)
        if row is None:
            raise KeyError(f"caption not in the text cache {self.path}: {caption!r}. Re-encode the data "
                           f"(python -m dd_jax.data.encode_text --data DATA_DIR --encoders CONVERTED_DIR) or "
                           f"encode online (make_pipeline(text_encoders=...))")
        txt, vec = self._open()
        return _from_stored(txt[row], self.dtype), _from_stored(vec[row], self.dtype)

    def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self[c] for c in captions]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ------------------------------------------------------------------ prompts at decomposition time
class PromptConditioning:
    """txt/vec for decomposition prompts: from a cache when it holds the prompt, else encoded online."""

    def __init__(self, cache: str | None = None, encoders: str | None = None):
        self.cache = TextCache(cache) if cache and os.path.isfile(os.path.join(cache, INDEX_FILE)) else None
        self.encoders = encoders or None
        self._encoder = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PromptConditioning:
        tc = config.text
        cache = tc.cache or (default_cache_dir(config.data.dir) if config.data.dir else "")
        return cls(cache or None, encoders_path(config) or None)

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and all(p in self.cache for p in prompts):
            return self.cache.lookup(prompts)
        if self.encoders is None:
            where = self.cache.path if self.cache is not None else "no text cache"
            missing = [p for p in prompts if self.cache is None or p not in self.cache]
            raise ValueError(f"no text embedding for prompt {missing[0]!r} ({where}); set text.encoders (or "
                             "model.weights) to a converted folder with t5/ and clip/, or add the prompt to the cache "
                             "(python -m dd_jax.data.encode_text --prompt ...)")
        if self._encoder is None:
            self._encoder = TextEncoder(self.encoders)
        return self._encoder.encode(prompts)


def encoders_path(config: ml_collections.ConfigDict) -> str:
    """The converted T5/CLIP folder a config names: text.encoders, else model.weights."""
    return config.text.encoders or config.model.weights
