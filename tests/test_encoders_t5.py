"""T5 v1.1 encoder port: parity with transformers' T5EncoderModel, position buckets, embedding names, bf16."""

from __future__ import annotations

import os

import encoders_reference as er
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from tolerance import rel_err

from dd_jax.models import t5
from weights_conversion import t5 as t5_maps
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

pytestmark = pytest.mark.matrix  # also run on the Python 3.12 leg of .ci/run


def _state(folder) -> dict:
    reader = SafetensorsReader.open(str(folder))
    return {k: reader.read(k) for k in reader.keys()}



BOUND = 2e-5  # error / reference scale; the true port is at ~1.3e-6 (docs/testing.md)
MISS = 10 * BOUND  # what a plausible wrong constant must show at least


def wrong(model, kind: str):
    """The converted model with a plausible porting mistake: RMSNorm eps 1e-5 (CLIP's) for T5's 1e-6, or GELU's
    exact form for gelu_new's tanh one."""
    for _, m in nnx.iter_graph(model):
        if kind == "eps" and isinstance(m, t5.T5LayerNorm):
            m.eps = 1e-5
        if kind == "exact_gelu" and hasattr(m, "act"):
            m.act = t5.ACTIVATIONS["gelu"]
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = er.make_t5(seed=0, embed_scale=0.1)  # small embeddings: a wrong eps shows
    root = tmp_path_factory.mktemp("t5")
    model.save_pretrained(root / "text_encoder_2", max_shard_size="30KB")  # sharded, as T5-XXL is on the hub
    assert any(f.endswith(".index.json") for f in os.listdir(root / "text_encoder_2"))
    out = t5_maps.convert_t5(str(root / "text_encoder_2"), str(root / "out"), progress=False)
    return model, out, root


def _ids(batch=2, n=40, seed=0, vocab=128):
    # 40 tokens: distances beyond relative_attention_max_distance (16) hit the log-spaced and clipped buckets
    return np.random.default_rng(seed).integers(0, vocab, (batch, n)).astype(np.int32)


def test_parity_last_hidden_state(converted):
    model, out, _ = converted
    ours = t5.load(out)
    assert ours.config.num_layers == 2 and ours.config.relative_attention_max_distance == 16
    ids = _ids()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    hidden = ours(jnp.asarray(ids))
    assert hidden.shape == ref.shape == (2, 40, 32)
    assert rel_err(hidden, ref) <= BOUND
    for kind in ("eps", "exact_gelu"):  # the fixture sees them: each misses the bound by 10x at least
        assert rel_err(wrong(t5.load(out), kind)(jnp.asarray(ids)), ref) >= MISS, kind


def test_parity_with_padding_mask(converted):
    model, out, _ = converted
    ours = t5.load(out)
    ids = _ids(seed=1)
    mask = np.ones_like(ids)
    mask[0, 25:] = 0
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    assert rel_err(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), ref) <= BOUND


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :]
    for buckets, distance in ((32, 128), (8, 16)):
        ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True, num_buckets=buckets,
                                                    max_distance=distance).numpy()
        ours = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), buckets, distance))
        np.testing.assert_array_equal(ours, ref)


def test_tied_embedding_names(converted, tmp_path):
    """Checkpoints holding `encoder.embed_tokens.weight` (alone, or beside `shared.weight`) convert the same."""
    model, out, root = converted
    state = _state(root / "text_encoder_2")
    ids = _ids(n=9, seed=2)
    expected = np.asarray(t5.load(out)(jnp.asarray(ids)))
    for name, variant in (("both", {**state, "encoder.embed_tokens.weight": state["shared.weight"]}),
                          ("only_encoder", {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                                            for k, v in state.items()})):
        src = tmp_path / name
        src.mkdir()
        (src / "config.json").write_text((root / "text_encoder_2" / "config.json").read_text())
        save_file(variant, str(src / "model.safetensors"))
        converted_variant = t5_maps.convert_t5(str(src), str(tmp_path / f"{name}_out"), progress=False)
        np.testing.assert_array_equal(np.asarray(t5.load(converted_variant)(jnp.asarray(ids))), expected)


def test_missing_block_fails_clearly(converted, tmp_path):
    _, _, root = converted
    state = _state(root / "text_encoder_2")
    del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    src = tmp_path / "broken"
    src.mkdir()
    (src / "config.json").write_text((root / "text_encoder_2" / "config.json").read_text())
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        t5_maps.convert_t5(str(src), str(tmp_path / "out"), progress=False)


def test_bfloat16_params_and_compute(converted):
    model, out, _ = converted
    ours = t5.load(out, dtype=jnp.bfloat16)
    assert ours.shared.embedding[...].dtype == jnp.bfloat16
    assert ours.encoder.final_layer_norm.scale[...].dtype == jnp.bfloat16
    ids = _ids(n=12, seed=3)
    hidden = ours(jnp.asarray(ids))
    assert hidden.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_err(hidden, ref) <= 5e-2


def test_grouping_follows_block_size():
    """Small blocks are written as one group each; a block over the budget as one group per module."""
    from weights_conversion import common

    plan = t5_maps.build_plan(t5.PRESETS["tiny"])
    by_block = common.grouping(plan, t5_maps.block)
    assert by_block("encoder.block.1.layer.1.DenseReluDense.wo.kernel") == "encoder.block.1"
    assert by_block("shared.embedding") == "shared"
    by_module = common.grouping(plan, t5_maps.block, budget=0)
    assert by_module("encoder.block.1.layer.1.DenseReluDense.wo.kernel") == "encoder.block.1.layer.1.DenseReluDense.wo"
