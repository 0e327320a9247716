"""Scanned (stacked-block) Flux layout: same function as the BFL layout, loads the same checkpoints,
LoRA on stacked layers, remat policies."""

from __future__ import annotations

import flux_reference as fr
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close

from dd_jax import lora
from dd_jax.models import flux, store
from weights_conversion import flux as flux_maps, plan as planlib

P = flux.PRESETS["tiny"]


def _flat(model) -> dict:
    _, st = nnx.split(model)
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(st)}


def _fill(model, flat) -> None:
    _, st = nnx.split(model)
    for p, v in nnx.to_flat_state(st):
        v.set_value(jnp.asarray(flat[".".join(map(str, p))]))


_ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")


@nnx.jit
def _jit_forward(model, *args):
    return model(*args)


def _fwd(model, x) -> np.ndarray:
    """The model's forward, jitted (eager dispatch of a whole model is slower than compiling it)."""
    return np.asarray(_jit_forward(model, *(None if x[k] is None else jnp.asarray(x[k]) for k in _ARGS)))


def _inputs(seed=1):
    return fr.inputs(batch=2, h=3, w=4, n_txt=5, in_channels=P.in_channels, context=P.context_in_dim,
                     pooled=P.vec_in_dim, seed=seed)


def _scanned_copy(model, **kw):
    """A scanned model holding the weights (and LoRA adapters) of an unscanned one."""
    s = flux.Flux(P, rngs=nnx.Rngs(1), scan_layers=True, **kw)
    if lora.lora_layers(model):
        lora.apply_lora(s, rank=model.double_blocks[0].img_attn.qkv.rank,
                        alpha=model.double_blocks[0].img_attn.qkv.scale * model.double_blocks[0].img_attn.qkv.rank)
    _fill(s, flux.stack_flat(_flat(model)))
    return s


def test_scanned_layout_paths_axes_and_same_outputs():
    m = flux.Flux(P, rngs=nnx.Rngs(0))
    s = _scanned_copy(m)
    kernel = s.double_blocks.img_mlp[0].kernel
    assert kernel.shape == (P.depth, P.hidden_size, 4 * P.hidden_size)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")
    assert set(_flat(s)) == set(flux.stack_flat(_flat(m)))
    sources = flux.stacked_sources(s)
    assert sources["single_blocks.linear1.kernel"] == [f"single_blocks.{i}.linear1.kernel" for i in range(2)]
    x = _inputs()
    assert_close(_fwd(s, x), _fwd(m, x), 1e-5, "scanned forward")
    # unstack_flat is stack_flat's inverse: the BFL paths come back, value for value
    back = flux.unstack_flat(_flat(s))
    assert set(back) == set(_flat(m))
    for k, v in _flat(m).items():
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v))


def test_converted_checkpoint_loads_into_both_layouts(tmp_path):
    """The converter's plan and streaming (grouped per block here, to keep the test fast)."""
    ref = fr.make_diffusers_flux(guidance=True, seed=2)
    ref.save_pretrained(tmp_path / "hub")
    reader, params, plan = flux_maps.transformer_plan(str(tmp_path / "hub"))
    with store.GroupedWriter(str(tmp_path / "conv"), model="flux", config=params.to_dict(), dtype="float32") as w:
        planlib.stream(plan, reader, w, np.float32, group_fn=store.default_group, progress=False)
        out = w.commit()
    x = fr.inputs(batch=2, h=3, w=5, guidance=True)
    want = fr.diffusers_forward(ref, x)
    unscanned = flux.load(out)
    scanned = flux.load(out, scan_layers=True, remat="full")
    assert scanned.scan_layers and scanned.double_blocks.img_attn.qkv.kernel.shape[0] == 2
    a, b = _fwd(unscanned, x), _fwd(scanned, x)
    assert_close(b, a, 1e-5, "scanned + remat forward")
    assert np.abs(b - want).max() / np.abs(want).max() <= 1e-4


def test_stacked_loading_reads_one_stacked_module_at_a_time():
    """With the converter's per-module groups, the layers of one stacked array are read back to back."""
    per_layer = {"double_blocks.0.img_mlp.0.kernel": ("double_blocks.img_mlp.0.kernel", 0),
                 "double_blocks.0.img_mlp.0.bias": ("double_blocks.img_mlp.0.bias", 0),
                 "double_blocks.1.img_mlp.0.kernel": ("double_blocks.img_mlp.0.kernel", 1),
                 "double_blocks.1.img_mlp.0.bias": ("double_blocks.img_mlp.0.bias", 1),
                 "double_blocks.0.img_mod.lin.kernel": ("double_blocks.img_mod.lin.kernel", 0),
                 "double_blocks.1.img_mod.lin.kernel": ("double_blocks.img_mod.lin.kernel", 1)}
    groups = ["img_in", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mod.lin", "double_blocks.1.img_mlp.0",
              "double_blocks.1.img_mod.lin", "final_layer.linear"]
    assert store._stacked_order(groups, per_layer) == [
        "img_in", "final_layer.linear", "double_blocks.0.img_mlp.0", "double_blocks.1.img_mlp.0",
        "double_blocks.0.img_mod.lin", "double_blocks.1.img_mod.lin"]


@nnx.jit
def _jit_loss_and_grads(model, *args):
    loss = lambda m: jnp.mean(jnp.square(m(*args)))
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def _loss_and_lora_grads(model, x):
    value, grads = _jit_loss_and_grads(model, *(jnp.asarray(x[k]) for k in _ARGS))
    return float(value), {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("remat", ["full", "proj", pytest.param("attn", marks=pytest.mark.slow),
                                   pytest.param("none", marks=pytest.mark.slow),
                                   pytest.param("dots_no_batch", marks=pytest.mark.slow),
                                   pytest.param("offload", marks=pytest.mark.slow)])
def test_stacked_lora_gradients_match_unscanned(remat):
    m = flux.Flux(P, rngs=nnx.Rngs(0))
    lora.apply_lora(m, rank=4, alpha=8)
    key = jax.random.key(3)
    for _, layer in lora.lora_layers(m):
        key, k = jax.random.split(key)
        layer.lora_b[...] = 0.1 * jax.random.normal(k, layer.lora_b.shape)
    s = _scanned_copy(m, remat=remat)
    assert s.double_blocks.img_attn.qkv.lora_a.shape == (P.depth, P.hidden_size, 4)
    assert s.double_blocks.img_attn.qkv.lora_b.get_metadata()["logical_axes"] == ("layers", "lora_rank", "qkv")
    x = _inputs(seed=4)
    lu, gu = _loss_and_lora_grads(m, x)
    ls, gs = _loss_and_lora_grads(s, x)
    assert abs(lu - ls) <= 1e-5 * abs(lu)
    gu = flux.stack_flat(gu)
    assert set(gu) == set(gs)
    for k in gs:
        np.testing.assert_allclose(gs[k], gu[k], atol=1e-5 * max(1.0, np.abs(gu[k]).max()), rtol=0, err_msg=k)


def test_stacked_lora_targets_and_merge():
    s = flux.Flux(P, rngs=nnx.Rngs(0), scan_layers=True)
    wrapped = lora.apply_lora(s, rank=2, alpha=4)
    assert sorted(wrapped) == sorted(["double_blocks.img_attn.qkv", "double_blocks.img_attn.proj",
                                      "double_blocks.txt_attn.qkv", "double_blocks.txt_attn.proj",
                                      "double_blocks.img_mlp.0", "double_blocks.img_mlp.2",
                                      "double_blocks.txt_mlp.0", "double_blocks.txt_mlp.2",
                                      "single_blocks.linear1", "single_blocks.linear2"])
    with pytest.raises(ValueError, match="only some layers"):
        lora.apply_lora(flux.Flux(P, rngs=nnx.Rngs(0), scan_layers=True), rank=2,
                        targets=(r"double_blocks\.0\.img_attn\.qkv",))
    for _, layer in lora.lora_layers(s):
        layer.lora_b[...] = 0.05 * jnp.ones(layer.lora_b.shape)
    x = _inputs(seed=6)
    before = _fwd(s, x)
    lora.merge_lora(s)
    assert not lora.lora_layers(s)
    assert s.double_blocks.img_attn.qkv.kernel.get_metadata()["logical_axes"] == ("layers", "embed", "qkv")
    assert_close(_fwd(s, x), before, 1e-5, "merged LoRA forward")


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="remat policy"):
        flux.Flux(P, rngs=nnx.Rngs(0), remat="sometimes")
    with pytest.raises(ValueError, match="attention implementation"):
        flux.Flux(P, rngs=nnx.Rngs(0), attention_impl="flash9")
