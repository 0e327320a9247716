"""Tiny random Flux pipeline pieces, saved as the hub saves them (test helper).

- `make_vae`, `make_t5`, `make_clip`: tiny random diffusers `AutoencoderKL` (Flux's
  configuration: 4 levels, 16 latent channels, no quant convs, Flux's scale and
  shift), transformers `T5EncoderModel` (v1.1, gated GELU) and `CLIPTextModel`.
- `clip_tokenizer`, `t5_tokenizer`: tokenizers trained on the spot with `tokenizers`.
- `make_tiny_pipeline(dir)`: a complete diffusers-layout Flux pipeline folder
  (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
  scheduler/, model_index.json) written by `FluxPipeline.save_pretrained`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

CORPUS = [
    "a photo of a cat", "a photo of a dog on the beach", "rain drops on a window in front of a street",
    "a glass bottle in an x-ray scan of a suitcase", "a translucent watermark over a city at night",
    "lens flare in the sunset sky", "fog over a mountain lake", "cells under a microscope, stained purple",
    "a transparent wine glass on a wooden table", "dirt and scratches on a car windshield",
]

VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
           act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
           shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
           force_upcast=True)
T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
          use_cache=False, tie_word_embeddings=False)
CLIP = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 24


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturbs constant-initialised tensors (norm scales and biases) so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and torch.all(p == p.flatten()[0]):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def make_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**{**VAE, **overrides}), seed)


def make_t5(seed: int = 0, embed_scale: float = 1.0, **overrides):
    """`embed_scale` multiplies the token embeddings: small ones (0.1: a mean square of ~1e-2 into the first
    RMSNorm) make a wrong eps show (tests/test_encoders_t5.py, docs/testing.md)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**{**T5, **overrides}))
    with torch.no_grad():  # T5's init is very small for tiny widths; make the blocks matter
        for name, p in model.named_parameters():
            if name.endswith(("q.weight", "k.weight", "v.weight", "o.weight",
                              "wi_0.weight", "wi_1.weight", "wo.weight")):
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
        model.shared.weight.mul_(embed_scale)
    return randomize(model, seed)


def make_clip(seed: int = 0, eos_token_id: int | None = None, **overrides):
    """`eos_token_id` defaults to the trained tokenizer's end-of-text id (the last one, vocab size - 1)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = {**CLIP, **overrides}
    eos = cfg["vocab_size"] - 1 if eos_token_id is None else eos_token_id
    model = CLIPTextModel(CLIPTextConfig(**cfg, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos))
    return randomize(model, seed)


def _clip_merges(vocab_size: int) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    from dd_jax.models.tokenizers import bytes_to_unicode

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = CLIPTokenizer().backend_tokenizer.normalizer
    bpe.pre_tokenizer = CLIPTokenizer().backend_tokenizer.pre_tokenizer
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def clip_tokenizer(out_dir: str, vocab_size: int = CLIP["vocab_size"], max_length: int = CLIP_MAX_LENGTH) -> str:
    """A CLIP BPE tokenizer trained on CORPUS, with exactly `vocab_size` ids (hub layout: vocab.json, merges.txt)."""
    from dd_jax.models.tokenizers import write_clip_tokenizer_files

    n_merges = vocab_size - 512 - 2
    merges = _clip_merges(256 + n_merges + 40)  # the trainer's vocab also counts a few non-merge symbols
    merges = [m for m in merges if "".join(m) not in _base_symbols()][:n_merges]
    if len(merges) != n_merges:
        raise RuntimeError(f"trained {len(merges)} merges, need {n_merges}")
    return write_clip_tokenizer_files(merges, out_dir, max_length)


def _base_symbols() -> set[str]:
    from dd_jax.models.tokenizers import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    return set(base) | {b + "</w>" for b in base}


def t5_tokenizer(out_dir: str | None = None, max_length: int = 512, vocab_size: int = 60, extra_ids: int = 4):
    """A T5 (Unigram, SentencePiece-style) tokenizer trained on CORPUS; saved with save_pretrained if out_dir."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    ug = Tokenizer(models.Unigram())
    ug.normalizer = normalizers.NFKC()
    ug.pre_tokenizer = pre_tokenizers.Metaspace()
    ug.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False,
                                                           special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))
    vocab = [tuple(v) for v in json.loads(ug.to_str())["model"]["vocab"]]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=max_length)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def make_tiny_pipeline(path: str, guidance: bool = True, seed: int = 0) -> dict:
    """Writes a tiny random diffusers Flux pipeline folder at `path`; returns its torch components by name.

    Shapes fit together as in FLUX.1: VAE latents (16 channels) pack 2x2 into
    the transformer's 64 input channels; T5's d_model is the transformer's
    joint_attention_dim and CLIP's width its pooled_projection_dim. Images
    must be multiples of 16 pixels (8x VAE downsampling, then 2x2 packing).
    """
    import flux_reference as fr
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok_dir = os.path.join(path, ".clip_tokenizer_src")
    clip_tokenizer(tok_dir)
    parts = dict(
        transformer=fr.make_diffusers_flux(guidance=guidance, seed=seed, in_channels=64,
                                           joint_attention_dim=T5["d_model"],
                                           pooled_projection_dim=CLIP["hidden_size"]),
        vae=make_vae(seed + 1),
        text_encoder=make_clip(seed + 2),
        text_encoder_2=make_t5(seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        tokenizer_2=t5_tokenizer(max_length=T5_MAX_LENGTH),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    )
    FluxPipeline(**parts).save_pretrained(path)
    import shutil

    shutil.rmtree(tok_dir)
    return parts


def vae_images(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random NHWC images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(-1, 1, (batch, size // 8, size // 8, 3))
    img = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2) + 0.2 * rng.standard_normal((batch, size, size, 3))
    return np.clip(img, -1, 1).astype(np.float32)
