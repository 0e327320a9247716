"""Flow matching and the Euler sampler: how network outputs are read (velocity, x0, residual)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax import flow, icd, sampling
from dd_jax.models import flux


class Constant(nnx.Module):
    """A stand-in transformer whose output for the target tokens is fixed per layer."""

    def __init__(self, outputs: jax.Array):
        self.outputs = nnx.Variable(outputs)  # [B, L_img, C], full image sequence

    def __call__(self, img, img_ids, txt, txt_ids, t, vec, guidance=None, cond_mask=None):
        return self.outputs[...] + 0.0 * img


SPEC = icd.LayerSpec(condition="z", targets=("x", "y"))
B, H, W, C = 2, 2, 3, 5
N = H * W


def _tokens(seed):
    return jax.random.normal(jax.random.key(seed), (B, N, C))


def _run(outputs, prediction, residual=(), steps=4, cond=None):
    cond = _tokens(0) if cond is None else cond
    txt, vec = jnp.zeros((B, 1, 4)), jnp.zeros((B, 4))
    return cond, sampling.sample(Constant(outputs), SPEC, cond, txt, vec, jax.random.key(1), (H, W), steps,
                                 prediction=prediction, residual=residual)


def test_x0_output_is_what_the_sampler_returns():
    x0 = {"x": _tokens(2), "y": _tokens(3)}
    out = jnp.concatenate([jnp.zeros((B, N, C)), x0["x"], x0["y"]], axis=1)
    _, got = _run(out, "x0")
    for name in ("x", "y"):
        np.testing.assert_allclose(got[name], x0[name], atol=1e-5)


def test_residual_output_is_an_offset_from_the_composite():
    # a network that outputs zeros returns the composite for residual layers and zeros for the others
    cond, got = _run(jnp.zeros((B, 3 * N, C)), "x0", residual=("y",))
    np.testing.assert_allclose(got["y"], cond, atol=1e-5)
    np.testing.assert_allclose(got["x"], 0.0, atol=1e-5)
    delta = _tokens(4)
    out = jnp.concatenate([jnp.zeros((B, 2 * N, C)), delta], axis=1)
    cond, got = _run(out, "x0", residual=("y",))
    np.testing.assert_allclose(got["y"], cond + delta, atol=1e-5)


def test_velocity_is_integrated_by_euler():
    v = _tokens(5)
    out = jnp.concatenate([jnp.zeros((B, N, C)), v, v], axis=1)
    steps = 3
    _, got = _run(out, "velocity", steps=steps)
    keys = jax.random.split(jax.random.key(1), 2)
    noise = jax.random.normal(keys[1], (B, N, C), jnp.float32)
    # x_0 = x_1 - v over the whole [1, 0] interval, whatever the schedule
    np.testing.assert_allclose(got["y"], noise - v, atol=1e-5)


def test_loss_is_zero_for_the_true_output_in_every_reading():
    key = jax.random.key(7)
    layers = {"z": _tokens(10), "x": _tokens(11), "y": _tokens(12)}
    batch = flow.Batch(layers=layers, txt=jnp.zeros((B, 1, 4)), txt_ids=jnp.zeros((1, 3)), y=jnp.zeros((B, 4)),
                       grid=(H, W))
    t, noise = flow.sample_noise(key, SPEC, batch)
    cases = {
        ("velocity", ()): [flow.velocity(layers[n], noise[n]) for n in ("x", "y")],
        ("x0", ()): [layers["x"], layers["y"]],
        ("x0", ("y",)): [layers["x"], layers["y"] - layers["z"]],
    }
    for (prediction, residual), targets in cases.items():
        out = jnp.concatenate([jnp.zeros((B, N, C))] + targets, axis=1)
        loss = flow.icd_loss(Constant(out), SPEC, batch, t, noise, prediction=prediction, residual=residual)
        assert float(loss) < 1e-8, (prediction, residual, float(loss))
        wrong = flow.icd_loss(Constant(out + 0.1), SPEC, batch, t, noise, prediction=prediction, residual=residual)
        assert float(wrong) > 1e-3


def test_bad_readings_are_refused():
    with pytest.raises(ValueError, match="residual"):
        flow.as_velocity(jnp.zeros(3), jnp.zeros(3), jnp.ones(1), "velocity", base=jnp.zeros(3))
    with pytest.raises(ValueError, match="prediction"):
        flow.as_velocity(jnp.zeros(3), jnp.zeros(3), jnp.ones(1), "eps")
    with pytest.raises(ValueError, match="not targets"):
        flow.target_velocities(SPEC, {}, {}, jnp.zeros(3), jnp.ones(1), "x0", residual=("z",))


def test_schedule_runs_from_noise_to_data_and_shifts_towards_noise():
    plain = np.asarray(flow.schedule(8, 1024, shift=False))
    shifted = np.asarray(flow.schedule(8, 1024, shift=True))
    for ts in (plain, shifted):
        assert ts[0] == pytest.approx(1.0) and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    assert np.all(shifted[1:-1] > plain[1:-1])


def test_x0_loss_is_the_clean_layer_error():
    layers = {"z": _tokens(20), "x": _tokens(21), "y": _tokens(22)}
    batch = flow.Batch(layers=layers, txt=jnp.zeros((B, 1, 4)), txt_ids=jnp.zeros((1, 3)), y=jnp.zeros((B, 4)),
                       grid=(H, W))
    t = jnp.array([0.3, 0.8])
    _, noise = flow.sample_noise(jax.random.key(3), SPEC, batch)
    guess = {"x": _tokens(23), "y": _tokens(24)}
    out = jnp.concatenate([jnp.zeros((B, N, C)), guess["x"], guess["y"] - layers["z"]], axis=1)
    got = flow.icd_loss(Constant(out), SPEC, batch, t, noise, prediction="x0", residual=("y",), loss="x0")
    want = np.mean([np.mean(np.square(np.asarray(guess[n]) - np.asarray(layers[n]))) for n in ("x", "y")])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    plain = flow.icd_loss(Constant(out), SPEC, batch, t, noise, prediction="x0", residual=("y",))
    assert float(plain) > 2 * float(got)  # the velocity loss divides the same error by t^2
    with pytest.raises(ValueError, match="loss"):
        flow.icd_loss(Constant(out), SPEC, batch, t, noise, loss="l1")


def test_train_step_with_every_loss_reading_lowers_the_loss():
    params = flux.FluxParams.from_dict({**flux.PRESETS["tiny"].to_dict(), "depth": 1, "depth_single_blocks": 1})
    c = params.in_channels
    layers = {n: jax.random.normal(jax.random.key(i), (2, 4, c)) for i, n in enumerate(SPEC.layers)}
    batch = flow.Batch(layers=layers, txt=jnp.zeros((2, 1, params.context_in_dim)), txt_ids=jnp.zeros((1, 3)),
                       y=jnp.zeros((2, params.vec_in_dim)), grid=(2, 2))
    for loss in flow.LOSSES:
        model = flux.Flux(params, rngs=nnx.Rngs(0))
        opt = flow.make_optimizer(model, 1e-3, wrt=nnx.Param)
        step = flow.make_train_step(SPEC, wrt=nnx.Param, guidance=None if not params.guidance_embed else 1.0,
                                    prediction="x0", residual=("y",), loss=loss)
        first = float(step(model, opt, batch, jax.random.key(0))[0])
        for _ in range(15):
            last = float(step(model, opt, batch, jax.random.key(0))[0])
        assert last < first, (loss, first, last)


def test_adaln_zero_tiny_model_starts_as_the_identity_decomposition():
    from configs import tiny
    from dd_jax import system as system_lib

    config = tiny.get_config()
    system = system_lib.build(config)
    comp = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    out = system_lib.decompose(system, comp, jnp.array([0, 3]), jax.random.key(1), steps=3)
    np.testing.assert_allclose(out["y"], comp, atol=1e-5)  # residual background: "no change"
    np.testing.assert_allclose(out["x"], 0.0, atol=1e-5)
    # the blocks are live (non-zero weights) and only their gates / the output start at zero
    blocks = nnx.state(system.model.transformer.double_blocks[0].img_attn, nnx.Param)
    kernels = [v.get_value() for p, v in nnx.to_flat_state(blocks) if p[-1] == "kernel"]
    assert kernels and all(np.abs(np.asarray(k)).max() > 0 for k in kernels)
    config.model.init = "kaiming"
    with pytest.raises(ValueError, match="model.init"):
        system_lib.build(config)
