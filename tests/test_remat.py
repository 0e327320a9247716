"""A fast gradient check for every remat policy that tests/test_scan.py checks only with -m slow (or not at all).

Rematerialisation must change what the backward pass keeps, never what it computes: the LoRA gradients
of a scanned model under each policy equal those of the plain unscanned model. A smaller model than the
`tiny` preset (hidden 32, two heads) keeps each policy's compilation to a few seconds.
"""

from __future__ import annotations

import flux_reference as fr
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close

from dd_jax import lora
from dd_jax.models import flux

P = flux.FluxParams(in_channels=8, out_channels=8, vec_in_dim=8, context_in_dim=8, hidden_size=32, mlp_ratio=2.0,
                    num_heads=2, depth=2, depth_single_blocks=1, axes_dim=(4, 6, 6), theta=10_000, qkv_bias=True,
                    guidance_embed=False)
_ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")


def _flat(model) -> dict:
    _, st = nnx.split(model)
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(st)}


def _model():
    m = flux.Flux(P, rngs=nnx.Rngs(0))
    lora.apply_lora(m, rank=2, alpha=4, rngs=nnx.Rngs(1))
    key = jax.random.key(3)
    for _, layer in lora.lora_layers(m):  # non-zero B: every adapter's A gets a gradient
        key, k = jax.random.split(key)
        layer.lora_b[...] = 0.1 * jax.random.normal(k, layer.lora_b.shape)
    return m


def _scanned_copy(model, remat: str):
    """The same weights and adapters in the scanned layout."""
    s = flux.Flux(P, rngs=nnx.Rngs(5), scan_layers=True, remat=remat)
    lora.apply_lora(s, rank=2, alpha=4)
    flat = flux.stack_flat(_flat(model))
    _, st = nnx.split(s)
    for p, v in nnx.to_flat_state(st):
        v.set_value(jnp.asarray(flat[".".join(map(str, p))]))
    return s


@nnx.jit
def _grads(model, *args):
    loss = lambda m: jnp.mean(jnp.square(m(*args)))
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def _flat_grads(model):
    x = fr.inputs(batch=2, h=2, w=3, n_txt=3, in_channels=8, context=8, pooled=8, guidance=False, seed=4)
    value, grads = _grads(model, *(jnp.asarray(x[k]) for k in _ARGS))
    return float(value), {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def reference():
    return _flat_grads(_model())  # unscanned, no remat


@pytest.mark.parametrize("remat", ["none", "dots", "dots_no_batch", "attn", "offload"])
def test_scanned_remat_gradients_match_plain_model(reference, remat):
    assert remat in flux.REMAT_POLICIES
    loss, grads = reference
    ls, gs = _flat_grads(_scanned_copy(_model(), remat))
    want = flux.stack_flat(grads)
    assert set(gs) == set(want) and len(gs) == 20  # 10 stacked adapters, A and B each
    assert abs(ls - loss) <= 1e-5 * abs(loss)
    for k in gs:
        assert_close(gs[k], want[k], 1e-4, k)
