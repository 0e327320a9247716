"""`icd.condition_t0` (README: condition tokens modulated as timestep 0, OminiControl) through the sampler and the
training loss, not only the transformer's call (tests/test_icd.py): the condition tokens' modulation must not move
with the noisy t, must equal the modulation of vec(t = 0) computed by hand, and the noisy tokens' must move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax import flow, icd, sampling
from dd_jax.models import flux, layers

B, H, W = 2, 2, 2
N = H * W


@pytest.fixture
def modulation_spy(monkeypatch):
    """Records (shift, scale) of every per-token modulation (the calls that have a condition mask), in order."""
    seen = []
    real = layers.modulations

    def spy(mod, vec, vec_cond, mask):
        out = real(mod, vec, vec_cond, mask)
        if mask is not None:
            jax.debug.callback(lambda s, c: seen.append((np.asarray(s), np.asarray(c))), out[0].shift,
                               out[0].scale, ordered=True)
        return out

    monkeypatch.setattr(layers, "modulations", spy)
    jax.clear_caches()  # the sampler's compiled programs would skip the spy
    yield seen
    jax.clear_caches()


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    model = flux.Flux(flux.PRESETS["tiny"], rngs=nnx.Rngs(seed))
    cond = jnp.asarray(rng.standard_normal((B, N, 64)), jnp.float32)
    txt = jnp.asarray(rng.standard_normal((B, 3, 32)), jnp.float32)
    vec = jnp.asarray(rng.standard_normal((B, 32)), jnp.float32)
    return model, cond, txt, vec


def split_tokens(shift, spec):
    """(condition tokens, noisy tokens) of a modulation [B, L, D]: the image tokens are the sequence's last
    len(layers) * N (the text stream's come first in single blocks), the condition layer's the first N of them."""
    img = shift[:, shift.shape[1] - len(spec.layers) * N:]
    return img[:, :N], img[:, N:]


def hand_t0_modulation(model, vec, guidance):
    """The first double block's image modulation (shift) of vec at t = 0, computed outside the model's call."""
    vec0 = model._vec(jnp.zeros(B), vec, guidance)
    return np.asarray(model.double_blocks[0].img_mod(vec0)[0].shift)


def test_sampler_modulates_condition_tokens_at_t0_every_step(modulation_spy):
    model, cond, txt, vec = inputs()
    spec = icd.LayerSpec(condition_t0=True)
    g = 3.5
    steps = 3
    sampling.sample(model, spec, cond, txt, vec, jax.random.key(1), (H, W), steps, guidance=g)
    jax.effects_barrier()
    per_step = len(modulation_spy) // steps
    assert per_step == 4 and len(modulation_spy) == steps * per_step  # 2 double + 2 single blocks, every step
    want = hand_t0_modulation(model, vec, jnp.full((B,), g))
    for j in range(per_step):  # each block: the condition tokens' modulation is the same at every step's t
        first_cond, first_noisy = split_tokens(modulation_spy[j][0], spec)
        for k in range(1, steps):
            cond_k, noisy_k = split_tokens(modulation_spy[k * per_step + j][0], spec)
            np.testing.assert_allclose(cond_k, first_cond, atol=1e-6, err_msg=f"block {j}, step {k}")
            assert np.abs(noisy_k - first_noisy).max() > 1e-3, f"block {j}: the noisy tokens' t did not move"
    for k in range(steps):  # and it is vec(t = 0)'s, by hand, on every condition token
        cond_k, _ = split_tokens(modulation_spy[k * per_step][0], spec)
        np.testing.assert_allclose(cond_k, np.broadcast_to(want, cond_k.shape), atol=1e-5)


def test_without_condition_t0_the_sampler_modulates_no_token_apart(modulation_spy):
    model, cond, txt, vec = inputs()
    sampling.sample(model, icd.LayerSpec(), cond, txt, vec, jax.random.key(1), (H, W), 2, guidance=3.5)
    jax.effects_barrier()
    assert modulation_spy == []  # no per-token modulation: the mutation check above is not vacuous


def test_training_loss_modulates_condition_tokens_at_t0(modulation_spy):
    model, cond, txt, vec = inputs(1)
    rng = np.random.default_rng(3)
    layer_tokens = {"z": cond, **{n: jnp.asarray(rng.standard_normal((B, N, 64)), jnp.float32) for n in "xy"}}
    batch = flow.Batch(layers=layer_tokens, txt=txt, txt_ids=jnp.zeros((3, 3)), y=vec, grid=(H, W))
    noise = {n: jnp.asarray(rng.standard_normal((B, N, 64)), jnp.float32) for n in "xy"}
    g = jnp.full((B,), 3.5)
    results = {}
    for condition_t0 in (True, False):
        spec = icd.LayerSpec(condition_t0=condition_t0)
        for t in (0.2, 0.9):
            modulation_spy.clear()
            flow.icd_loss(model, spec, batch, jnp.full((B,), t), noise, g)
            jax.effects_barrier()
            results[condition_t0, t] = [s for s, _ in modulation_spy]
    assert not results[False, 0.2]  # no per-token modulation without the setting
    want = hand_t0_modulation(model, vec, g)
    for j, (a, b) in enumerate(zip(results[True, 0.2], results[True, 0.9])):
        cond_a, noisy_a = split_tokens(a, icd.LayerSpec())
        cond_b, noisy_b = split_tokens(b, icd.LayerSpec())
        np.testing.assert_allclose(cond_a, cond_b, atol=1e-6, err_msg=f"block {j}: condition tokens moved with t")
        assert np.abs(noisy_a - noisy_b).max() > 1e-3
    cond_a, _ = split_tokens(results[True, 0.2][0], icd.LayerSpec())
    np.testing.assert_allclose(cond_a, np.broadcast_to(want, cond_a.shape), atol=1e-5)
