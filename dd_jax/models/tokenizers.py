"""Prompt tokenization for Flux's text encoders: transformers tokenizers loaded from disk.

Flux pads and truncates every prompt to a fixed length: 77 tokens for CLIP,
512 for T5 with FLUX.1-dev and 256 with FLUX.1-schnell. The converter copies
each tokenizer into its encoder's folder (`OUT/clip/tokenizer`,
`OUT/t5/tokenizer`, with T5's prompt length as `model_max_length`), and the
loaders here also take a diffusers pipeline folder (`tokenizer/`,
`tokenizer_2/`) or a tokenizer folder itself.

    tok = tokenizers.load_t5_tokenizer(OUT)        # or OUT/t5, OUT/t5/tokenizer, PIPELINE_DIR
    ids, mask = tok(["a glass bottle in an x-ray scan"])   # int32 [B, 512] each

`write_clip_tokenizer_files` rebuilds CLIP's tokenizer (vocab.json +
merges.txt, the layout of the hub's CLIP folders) from a list of BPE merges,
e.g. those of the `bpe_simple_vocab_16e6.txt.gz` file OpenAI's and
OpenCLIP's packages ship.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = {"flux-dev": 512, "flux-schnell": 256}
TOKENIZER_DIR = "tokenizer"
_PIPELINE_DIRS = {"clip": "tokenizer", "t5": "tokenizer_2"}  # diffusers pipeline layout
_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


class Tokens(NamedTuple):
    input_ids: np.ndarray  # int32 [B, L]
    attention_mask: np.ndarray  # int32 [B, L], 1 = real token


@dataclasses.dataclass
class PromptTokenizer:
    """A transformers tokenizer that pads and truncates to a fixed `max_length`."""

    tokenizer: Any
    max_length: int

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True)
        return Tokens(np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def find_tokenizer(path: str, kind: str) -> str:
    """The tokenizer folder of `kind` ("clip" or "t5") at or under `path`."""
    path = os.fspath(path)
    if kind not in _PIPELINE_DIRS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {sorted(_PIPELINE_DIRS)}")
    if os.path.isfile(os.path.join(path, "model_index.json")):  # a diffusers pipeline folder
        candidates = [os.path.join(path, _PIPELINE_DIRS[kind])]
    else:  # a tokenizer folder, a converted encoder (OUT/t5) or a converted pipeline (OUT)
        candidates = [path, os.path.join(path, TOKENIZER_DIR), os.path.join(path, kind, TOKENIZER_DIR)]
    for c in candidates:
        if os.path.isdir(c) and any(os.path.isfile(os.path.join(c, m)) for m in _MARKERS):
            return c
    raise FileNotFoundError(f"{path}: no {kind} tokenizer here (looked in {candidates})")


def _load(path: str, kind: str, max_length: int | None, default: int) -> PromptTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(find_tokenizer(path, kind))
    if max_length is None:
        stored = getattr(tok, "model_max_length", None)
        max_length = int(stored) if stored and stored < 1_000_000 else default
    return PromptTokenizer(tok, int(max_length))


def load_clip_tokenizer(path: str, max_length: int | None = None) -> PromptTokenizer:
    """CLIP tokenizer; prompts become `max_length` ids (default: the tokenizer's, 77 for CLIP-L)."""
    return _load(path, "clip", max_length, CLIP_MAX_LENGTH)


def load_t5_tokenizer(path: str, max_length: int | None = None) -> PromptTokenizer:
    """T5 tokenizer; prompts become `max_length` ids (default: the folder's `model_max_length`, else 512)."""
    return _load(path, "t5", max_length, T5_MAX_LENGTH["flux-dev"])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_clip_bpe_merges(path: str, n_merges: int = 49152 - 256 - 2) -> list[tuple[str, str]]:
    """The merges of OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the first line is a header)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : n_merges + 1]]


def write_clip_tokenizer_files(merges: Sequence[tuple[str, str]], out_dir: str,
                               max_length: int = CLIP_MAX_LENGTH) -> str:
    """Writes a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) built as CLIP builds it:
    256 byte symbols, the same with `</w>`, one token per merge, then `<|startoftext|>`, `<|endoftext|>`."""
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(set(vocab)) != len(vocab):
        raise ValueError("merges produce duplicate tokens")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
