"""Whole-pipeline conversion: a tiny diffusers Flux folder converts in one command into loadable components
whose outputs (and tokenization) match diffusers' own pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import encoders_reference as er
import flux_reference as fr
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerance import rel_err

from dd_jax.models import autoencoder, clip, flux, store, t5, tokenizers
from weights_conversion import convert, pipeline
from weights_conversion.safetensors_reader import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a glass bottle in an x-ray scan of a suitcase", "fog over a mountain lake, seen through a dirty window"]



@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    parts = er.make_tiny_pipeline(root / "pipe")
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_flux.py"), "--source",
                        str(root / "pipe"), "--output", str(root / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return parts, str(root / "pipe"), str(root / "out")


def test_layout(converted):
    _, _, out = converted
    assert sorted(os.listdir(out)) == ["clip", "t5", "transformer", "vae"]
    for name, model in (("transformer", "flux"), ("vae", "autoencoder"), ("t5", "t5"), ("clip", "clip")):
        meta = store.read_meta(os.path.join(out, name))
        assert meta["model"] == model and meta["dtype"] == "float32"
    for name in ("t5", "clip"):
        assert os.path.isfile(os.path.join(out, name, "tokenizer", "tokenizer_config.json"))


def test_components_match_torch(converted):
    parts, _, out = converted
    ours = flux.load(os.path.join(out, "transformer"))
    x = fr.inputs(batch=1, h=2, w=3, in_channels=64, context=er.T5["d_model"], pooled=er.CLIP["hidden_size"])
    forward = nnx.jit(lambda m, a: m(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timesteps"], a["y"],
                                     a["guidance"]))
    assert rel_err(forward(ours, x), fr.diffusers_forward(parts["transformer"], x)) <= 1e-4

    vae = autoencoder.load(os.path.join(out, "vae"))
    images = er.vae_images(batch=1, size=32, seed=2)
    with torch.no_grad():
        ref = parts["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
    ref = ((ref - 0.1159) * 0.3611).permute(0, 2, 3, 1).numpy()
    assert rel_err(nnx.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(images)), ref) <= 1e-4


def test_text_conditioning_matches_diffusers_encode_prompt(converted):
    """Our tokenizers + T5 + CLIP give what FluxPipeline.encode_prompt gives (T5 states, CLIP pooled)."""
    from diffusers import FluxPipeline

    parts, _, out = converted
    pipe = FluxPipeline(**parts)
    t5_tok = tokenizers.load_t5_tokenizer(out)
    assert t5_tok.max_length == er.T5_MAX_LENGTH  # the tiny tokenizer's own limit caps dev's 512
    with torch.no_grad():
        ref_t5, ref_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=t5_tok.max_length)
    ids, _ = t5_tok(PROMPTS)
    assert rel_err(t5.load(os.path.join(out, "t5"))(ids), ref_t5.numpy()) <= 1e-4
    clip_ids, _ = tokenizers.load_clip_tokenizer(out)(PROMPTS)
    assert clip_ids.shape == (2, er.CLIP_MAX_LENGTH)
    _, pooled = clip.load(os.path.join(out, "clip"))(clip_ids)
    assert rel_err(pooled, ref_pooled.numpy()) <= 1e-4


def test_tokenizers_load_from_every_kind_of_folder(converted):
    parts, pipe, out = converted
    expected = parts["tokenizer_2"](PROMPTS, padding="max_length", max_length=er.T5_MAX_LENGTH, truncation=True)
    for where in (out, os.path.join(out, "t5"), os.path.join(out, "t5", "tokenizer"), pipe):
        ids, mask = tokenizers.load_t5_tokenizer(where, max_length=er.T5_MAX_LENGTH)(PROMPTS)
        np.testing.assert_array_equal(ids, expected["input_ids"])
        np.testing.assert_array_equal(mask, expected["attention_mask"])
    clip_expected = parts["tokenizer"](PROMPTS, padding="max_length", max_length=16, truncation=True)["input_ids"]
    for where in (out, os.path.join(out, "clip"), pipe):
        np.testing.assert_array_equal(tokenizers.load_clip_tokenizer(where)(PROMPTS).input_ids, clip_expected)
    with pytest.raises(FileNotFoundError, match="no t5 tokenizer"):
        tokenizers.load_t5_tokenizer(os.path.join(out, "vae"))


def test_components_subset_and_errors(converted, tmp_path):
    _, pipe, _ = converted
    out = tmp_path / "out"
    assert convert.main(["--source", pipe, "--output", str(out), "--components", "vae,clip", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["clip", "vae"]
    # an existing component folder stops everything before anything is written
    assert convert.main(["--source", pipe, "--output", str(out), "--components", "t5,clip", "--quiet"]) == 2
    assert sorted(os.listdir(out)) == ["clip", "vae"]
    with pytest.raises(SystemExit) as e:
        convert.main(["--source", pipe, "--output", str(out), "--components", "vae,unet"])
    assert e.value.code == 2
    partial = tmp_path / "partial"
    shutil.copytree(pipe, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        pipeline.convert_pipeline(str(partial), str(tmp_path / "out2"), "t5", progress=False)
    assert not os.path.exists(tmp_path / "out2")


def test_t5_prompt_length_by_variant(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "tokenizer_2").mkdir()
    for guidance, tokenizer_max, expected in ((True, 512, 512), (False, 512, 256), (False, 100, 100)):
        (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": guidance}))
        (tmp_path / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer_max}))
        assert pipeline.t5_max_length(str(tmp_path)) == expected
