"""Attention implementations: selection, clear errors, and splash (Pallas, interpret mode on CPU) = XLA;
the hand-written gradients (XLA attention, GELU) = autodiff.

cuDNN flash attention needs an NVIDIA GPU: on CPU only its selection logic
is checked here (scripts/benchmark or a GPU run exercises the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax.models import flux, layers


def test_resolution_and_errors():
    r = layers.resolve_attention
    assert r("xla", jnp.float32, "cpu") == "xla" and r(None, None, "cpu") == "xla"
    assert r("auto", jnp.bfloat16, "cpu") == "xla"
    assert r("auto", jnp.bfloat16, "gpu") == "cudnn" and r("auto", jnp.float32, "gpu") == "xla"
    assert r("auto", jnp.float32, "tpu") == "splash"
    assert r("cudnn", jnp.bfloat16, "gpu") == "cudnn"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        r("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ValueError, match="bfloat16/float16"):
        r("cudnn", jnp.float32, "gpu")
    with pytest.raises(ValueError, match="choose from"):
        r("flash", None, "cpu")


def _qkv(b=2, n=150, h=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda: jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 20, (b, n, 3)), jnp.float32)
    return f(), f(), f(), layers.embed_nd(ids, (4, 6, 6), 10_000)


def test_splash_matches_xla_forward_and_gradient():
    """Length 150 is padded to the 128-block grid; padded keys must not leak into real queries."""
    q, k, v, pe = _qkv()
    run = lambda impl: jax.jit(lambda q, k, v: layers.attention(q, k, v, pe, implementation=impl))
    np.testing.assert_allclose(run("splash")(q, k, v), run("xla")(q, k, v), atol=2e-5, rtol=0)
    loss = lambda impl: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
        layers.attention(q, k, v, pe, implementation=impl))), argnums=(0, 1, 2)))
    for gs, gx in zip(loss("splash")(q, k, v), loss("xla")(q, k, v)):
        np.testing.assert_allclose(gs, gx, atol=5e-5, rtol=0)


def test_xla_attention_hand_written_backward_matches_autodiff():
    """The "xla" kernel's custom VJP = autodiff of jax.nn.dot_product_attention."""
    q, k, v, _ = _qkv(n=40, seed=2)
    ours = lambda q, k, v: layers.xla_attention(q, k, v)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), atol=1e-6, rtol=0)
    grads = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.cos(f(q, k, v)) * v), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grads(ours), grads(ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_cudnn_is_refused_on_cpu_with_a_clear_message():
    q, k, v, pe = _qkv(n=8)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        layers.attention(q, k, v, pe, implementation="cudnn")


def test_flux_with_splash_attention_matches_xla():
    p = flux.FluxParams.from_dict({**flux.PRESETS["tiny"].to_dict(), "depth": 1, "depth_single_blocks": 1})
    rng = np.random.default_rng(3)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    ids = jnp.asarray(np.stack(np.meshgrid(np.zeros(1), np.arange(3), np.arange(4), indexing="ij"), -1).reshape(12, 3),
                      jnp.float32)
    args = (f(1, 12, 64), ids, f(1, 5, 32), jnp.zeros((5, 3)), jnp.array([0.4]), f(1, 32), jnp.array([3.0]))
    fwd = nnx.jit(lambda m, *a: m(*a))
    xla = flux.Flux(p, rngs=nnx.Rngs(0), attention_impl="xla")
    splash = flux.Flux(p, rngs=nnx.Rngs(0), attention_impl="splash", scan_layers=False)
    np.testing.assert_allclose(fwd(splash, *args), fwd(xla, *args), atol=2e-5, rtol=0)


def test_gelu_recomputed_gradient_matches_autodiff():
    x = jnp.linspace(-6, 6, 1001, dtype=jnp.float32)
    np.testing.assert_array_equal(layers.gelu(x), jax.nn.gelu(x, approximate=True))
    ours = jax.grad(lambda x: jnp.sum(jnp.sin(layers.gelu(x))))(x)
    ref = jax.grad(lambda x: jnp.sum(jnp.sin(jax.nn.gelu(x, approximate=True))))(x)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)
