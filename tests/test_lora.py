"""LoRA partitions on the Flux model: identity at init, merging, frozen base, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close

from dd_jax import flow, icd, lora
from dd_jax.models import flux

H, W = 2, 3  # token grid per layer


def _model(seed=0):
    return flux.Flux(flux.PRESETS["tiny"], rngs=nnx.Rngs(seed))


def _batch(seed=0, bsz=2):
    rng = np.random.default_rng(seed)
    p = flux.PRESETS["tiny"]
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return flow.Batch(layers={n: f(bsz, H * W, p.in_channels) for n in ("z", "x", "y")},
                      txt=f(bsz, 4, p.context_in_dim), txt_ids=jnp.zeros((4, 3)), y=f(bsz, p.vec_in_dim),
                      grid=(H, W))


def _forward(model, b, spec=None):
    spec = icd.LayerSpec() if spec is None else spec
    img, ids, _, _ = icd.build_sequence(spec, b.layers, H, W)
    return model(img, jnp.asarray(ids), b.txt, b.txt_ids, jnp.array([0.2, 0.7]), b.y, jnp.array([2.0, 4.0]))


def _randomize_b(model, seed=1):
    key = jax.random.key(seed)
    for _, layer in lora.lora_layers(model):
        key, k = jax.random.split(key)
        layer.lora_b[...] = 0.05 * jax.random.normal(k, layer.lora_b[...].shape)


def test_default_targets_and_modulation_option():
    m = _model()
    wrapped = lora.apply_lora(m, rank=4, alpha=8)
    p = flux.PRESETS["tiny"]
    assert len(wrapped) == p.depth * 8 + p.depth_single_blocks * 2
    assert "double_blocks.0.img_attn.qkv" in wrapped and "single_blocks.1.linear2" in wrapped
    assert not any("mod" in w for w in wrapped)
    m2 = _model()
    wrapped2 = lora.apply_lora(m2, rank=4, targets=lora.DEFAULT_TARGETS + lora.MODULATION_TARGETS)
    assert len(wrapped2) == len(wrapped) + p.depth * 2 + p.depth_single_blocks
    # base weights stay at their paths; adapters are LoRAParams next to them
    names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))}
    assert "double_blocks.0.img_attn.qkv.lora_a" in names and "double_blocks.0.img_attn.qkv.kernel" not in names
    assert m.double_blocks[0].img_attn.qkv.lora_a[...].shape == (64, 4)
    assert m.double_blocks[0].img_attn.qkv.scale == 2.0
    with pytest.raises(ValueError):
        lora.apply_lora(_model(), rank=4, targets=(r"nothing\.here",))


def test_zero_b_is_exactly_the_base_model():
    b = _batch()
    base = _forward(_model(), b)
    m = _model()
    lora.apply_lora(m, rank=4, alpha=4)
    np.testing.assert_array_equal(np.asarray(_forward(m, b)), np.asarray(base))


def test_merge_matches_unmerged():
    b = _batch()
    m = _model()
    lora.apply_lora(m, rank=4, alpha=16)
    _randomize_b(m)
    unmerged = _forward(m, b)
    assert np.abs(np.asarray(unmerged - _forward(_model(), b))).max() > 1e-3  # the adapters do something
    lora.merge_lora(m)
    assert not lora.lora_layers(m) and not nnx.state(m, nnx.LoRAParam)
    assert_close(_forward(m, b), unmerged, 1e-5, "merged forward")


@pytest.mark.matrix
def test_train_step_touches_only_lora_and_fits_a_batch():
    m = _model()
    lora.apply_lora(m, rank=8, alpha=8)
    base_before = jax.tree.map(np.array, nnx.state(m, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.array, nnx.state(m, nnx.LoRAParam))
    opt = flow.make_optimizer(m, learning_rate=3e-3)
    # optimizer state exists for LoRA parameters only
    opt_leaves = jax.tree.leaves(nnx.state(opt, nnx.OptState))
    n_lora = sum(x.size for x in jax.tree.leaves(lora_before))
    assert sum(x.size for x in opt_leaves if x.ndim > 0) == 2 * n_lora  # adam mu and nu
    step = flow.make_train_step(icd.LayerSpec(), guidance=3.5)
    batch, key = _batch(seed=3), jax.random.key(0)  # one fixed batch, t and noise
    losses = [float(step(m, opt, batch, key)[0]) for _ in range(50)]
    assert losses[-1] <= 0.5 * losses[0], losses[::10]
    base_after = jax.tree.map(np.array, nnx.state(m, nnx.Not(nnx.LoRAParam)))
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(lora_before), jax.tree.leaves(jax.tree.map(np.array, nnx.state(m, nnx.LoRAParam))))]
    assert all(changed)


def _lora_system(**sample):
    from configs import tiny
    from dd_jax import system as system_lib

    c = tiny.get_config()
    c.model.params = dict(c.model.params, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1,
                          vec_in_dim=16, context_in_dim=16, axes_dim=(4, 6, 6))
    c.model.init = "default"
    c.lora.enabled, c.lora.rank, c.lora.alpha = True, 4, 4.0
    c.text.length = 3
    c.data.height = c.data.width = 32
    c.sample.update(sample)
    system = system_lib.build(c)
    _randomize_b(system.model.transformer)
    return system


def test_for_sampling_merges_lora_into_a_float_base_only():
    from dd_jax import quantize, system as system_lib

    composite = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
    run = lambda s: system_lib.decompose(s, composite, jnp.array([1]), jax.random.key(0), 2)
    system = _lora_system()
    before = run(system)
    n_adapted = len(lora.lora_layers(system.model.transformer))
    assert n_adapted > 0
    system_lib.for_sampling(system)
    assert not lora.lora_layers(system.model.transformer)  # each projection one matmul now
    for name, img in run(system).items():  # the sampler's cached split was dropped: it runs the merged model
        assert_close(img, before[name], 1e-5, f"merged {name}")
    kept = _lora_system(merge_lora=False)
    assert len(lora.lora_layers(system_lib.for_sampling(kept).model.transformer)) == n_adapted
    with quantize.requested("int8"):  # adapters over a quantized base stay separate
        q = system_lib.for_sampling(_lora_system())
    assert len(lora.lora_layers(q.model.transformer)) == n_adapted and quantize.quantized_paths(q.model.transformer)
