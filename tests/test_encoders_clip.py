"""CLIP text encoder port: parity with transformers' CLIPTextModel (with and without `text_model.`), EOS
pooling conventions, and the real CLIP BPE tokenizer rebuilt from the vocabulary file open-clip-torch ships."""

from __future__ import annotations

import importlib.util
import json
import os

import encoders_reference as er
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from tolerance import rel_err

from dd_jax.models import clip, tokenizers
from weights_conversion import clip as clip_maps

pytestmark = pytest.mark.matrix  # also run on the Python 3.12 leg of .ci/run


BOUND = 2e-5  # error / reference scale; the true port is at ~4e-7 (docs/testing.md)
MISS = 10 * BOUND  # what a plausible wrong constant must show at least


def _wrong(model, kind: str):
    """The converted model with a plausible porting mistake: LayerNorm eps 1e-6 (T5's, Flux's) for CLIP's 1e-5,
    or quick_gelu's 1.702 written as 1.7."""
    for _, m in nnx.iter_graph(model):
        if kind == "eps" and isinstance(m, clip.LayerNorm):
            m.eps = 1e-6
        if kind == "quick_gelu_1.7" and hasattr(m, "act"):
            m.act = lambda x: x * jax.nn.sigmoid(1.7 * x)
    return model


def _torch(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ids(seed, eos, batch=3, n=16, vocab=600):
    """Random ids below `eos`, one EOS per row at a random place, a larger id after it in row 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(eos, vocab - 2), (batch, n))
    ids[:, 0] = vocab - 2
    for row, pos in enumerate(rng.integers(2, n - 2, batch)):
        ids[row, pos] = eos
    return ids.astype(np.int32)


def test_parity_transformers5_layout(tmp_path):
    """transformers 5 saves without `text_model.`; eos_token_id is the real id: pooled at its first position."""
    model = er.make_clip(seed=0, eos_token_id=5)
    model.save_pretrained(tmp_path / "text_encoder")
    assert not any(k.startswith("text_model.") for k in load_file(str(tmp_path / "text_encoder" / "model.safetensors")))
    ours = clip.load(clip_maps.convert_clip(str(tmp_path / "text_encoder"), str(tmp_path / "out"), progress=False))
    ids = _ids(seed=1, eos=5)
    ids[0, -1] = 5  # a second EOS later in the row: the first one counts
    ref_hidden, ref_pooled = _torch(model, ids)
    hidden, pooled = ours(jnp.asarray(ids))
    assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape == (3, 32)
    assert rel_err(hidden, ref_hidden) <= BOUND
    assert rel_err(pooled, ref_pooled) <= BOUND
    out = str(tmp_path / "out")
    for kind in ("eps", "quick_gelu_1.7"):  # the fixture sees them: each misses the bound by 10x at least
        assert rel_err(_wrong(clip.load(out), kind)(jnp.asarray(ids))[0], ref_hidden) >= MISS, kind


def test_parity_prefixed_legacy_checkpoint(tmp_path):
    """Flux's text_encoder/ layout: names under `text_model.`, a `position_ids` buffer, and eos_token_id 2
    (OpenAI's convention: pooled at the largest id)."""
    model = er.make_clip(seed=2, eos_token_id=2)
    model.save_pretrained(tmp_path / "v5")
    state = {f"text_model.{k}": v for k, v in load_file(str(tmp_path / "v5" / "model.safetensors")).items()}
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    src = tmp_path / "text_encoder"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    config = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert config["eos_token_id"] == 2
    (src / "config.json").write_text(json.dumps(config))
    ours = clip.load(clip_maps.convert_clip(str(src), str(tmp_path / "out"), progress=False))
    assert ours.config.eos_token_id == 2
    ids = _ids(seed=3, eos=599)
    ref_hidden, ref_pooled = _torch(model, ids)
    hidden, pooled = ours(jnp.asarray(ids))
    assert rel_err(hidden, ref_hidden) <= BOUND
    assert rel_err(pooled, ref_pooled) <= BOUND


def test_too_many_tokens_is_an_error(tmp_path):
    model = er.make_clip(seed=4)
    model.save_pretrained(tmp_path / "te")
    ours = clip.load(clip_maps.convert_clip(str(tmp_path / "te"), str(tmp_path / "out"), progress=False))
    with pytest.raises(ValueError, match="at most 16"):
        ours(jnp.zeros((1, 17), jnp.int32))


def _open_clip_vocab():
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it (no torchvision needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(_open_clip_vocab() is None, reason="needs open-clip-torch's bpe_simple_vocab_16e6.txt.gz "
                    "(pip install --no-deps open-clip-torch==3.3.0)")
def test_real_clip_bpe_tokenizer(tmp_path):
    merges = tokenizers.read_clip_bpe_merges(_open_clip_vocab())
    assert len(merges) == 48894
    folder = tokenizers.write_clip_tokenizer_files(merges, str(tmp_path / "tokenizer"))
    assert sorted(os.listdir(folder)) == ["merges.txt", "tokenizer_config.json", "vocab.json"]  # the hub's files
    tok = tokenizers.load_clip_tokenizer(folder)
    assert tok.max_length == 77 and len(tok.tokenizer) == 49408
    ids, mask = tok(["a photo of a cat", "A  Photo of a CAT!"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    # OpenAI CLIP's known encoding of "a photo of a cat": <|startoftext|> a photo of a cat <|endoftext|>
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 49407).all() and mask[0].sum() == 7  # padded with <|endoftext|>
    np.testing.assert_array_equal(ids[1, :6], ids[0, :6])  # lower-cased, whitespace-normalised
    assert ids[1, 6] == 256  # "!</w>"
    long_ids, _ = tok(" ".join(["cat"] * 100))
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == 49407  # truncated, EOS kept
