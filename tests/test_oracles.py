"""Independent oracles: expected values written by hand (or by the public reference), never produced by
the code under test. Each test names the plausible mistake it exists to catch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P
from tolerance import rel_err

from dd_jax import flow, icd, lora, sampling, sharding
from dd_jax.data import blend
from dd_jax.metrics import pixel
from dd_jax.models import flux, layers
from weights_conversion import flux as flux_maps


# ------------------------------------------------------------------ ICD position ids
def test_grid_ids_of_a_2x3_grid():
    """Rows before columns, (index, row, col) order: catches swapped rows and columns."""
    want = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2],
                     [0, 1, 0], [0, 1, 1], [0, 1, 2]], np.float32)
    np.testing.assert_array_equal(icd.grid_ids(2, 3), want)
    np.testing.assert_array_equal(icd.grid_ids(2, 3, slot=2), want + [2, 0, 0])
    np.testing.assert_array_equal(icd.grid_ids(2, 3, slot=1, offset="spatial"), want + [0, 0, 3])


def test_lpec_position_ids_by_hand():
    """[z | x | y] on a 1x2 grid: y cloned from z, x on the next index slot; the ablation gives y slot 2."""
    z = [[0, 0, 0], [0, 0, 1]]
    x = [[1, 0, 0], [1, 0, 1]]
    np.testing.assert_array_equal(icd.position_ids(icd.LayerSpec(), 1, 2), np.array(z + x + z, np.float32))
    np.testing.assert_array_equal(icd.position_ids(icd.LayerSpec(lpec=False), 1, 2),
                                  np.array(z + x + [[2, 0, 0], [2, 0, 1]], np.float32))


# ------------------------------------------------------------------ flow: shift, schedule, T_MIN
def test_flux_shift_end_points():
    """Flux's line through (256, 0.5) and (4096, 1.15): catches a flipped slope or swapped end points."""
    assert flow.flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flow.flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flow.flux_mu(1024) == pytest.approx(0.63, abs=1e-12)  # 0.5 + 0.65 * 768 / 3840


def test_time_shift_by_hand():
    # t' = e^mu / (e^mu + 1/t - 1)
    assert float(flow.time_shift(0.25, math.log(2.0))) == pytest.approx(0.4, rel=1e-6)  # 2 / (2 + 3)
    assert float(flow.time_shift(0.5, math.log(3.0))) == pytest.approx(0.75, rel=1e-6)  # 3 / (3 + 1)
    assert float(flow.time_shift(0.0, 1.0)) == 0.0 and float(flow.time_shift(1.0, 1.0)) == pytest.approx(1.0)
    # two steps at 4096 tokens: the middle time is e^1.15 / (e^1.15 + 1)
    np.testing.assert_allclose(np.asarray(flow.schedule(2, 4096)), [1.0, 0.7595109, 0.0], rtol=1e-6, atol=0)


def test_velocity_reading_below_t_min():
    """x0 -> velocity divides by max(t, 0.05): catches a dropped floor (a division by 0.01)."""
    x_t, out = jnp.ones((2, 1, 1)), jnp.full((2, 1, 1), 0.5)
    v = flow.as_velocity(out, x_t, jnp.array([0.01, 0.5]), "x0")
    np.testing.assert_allclose(np.asarray(v).ravel(), [0.5 / 0.05, 0.5 / 0.5], rtol=1e-6)
    v = flow.as_velocity(out, x_t, jnp.array([0.01, 0.5]), "x0", base=jnp.full((2, 1, 1), 0.25))
    np.testing.assert_allclose(np.asarray(v).ravel(), [0.25 / 0.05, 0.25 / 0.5], rtol=1e-6)


class Zero(nnx.Module):
    def __call__(self, img, img_ids, txt, txt_ids, t, vec, guidance=None, cond_mask=None):
        return jnp.zeros_like(img)


def test_x0_loss_weight_below_t_min():
    """The x0 loss weighs the velocity error by max(t, 0.05)^2: 0.0025 at t = 0.01, 0.25 at t = 0.5."""
    spec = icd.LayerSpec(targets=("x", "y"))
    k = jax.random.split(jax.random.key(0), 5)
    layers_ = {n: jax.random.normal(kk, (2, 6, 3)) for n, kk in zip("zxy", k[:3])}
    noise = {"x": jax.random.normal(k[3], (2, 6, 3)), "y": jax.random.normal(k[4], (2, 6, 3))}
    batch = flow.Batch(layers=layers_, txt=jnp.zeros((2, 1, 4)), txt_ids=jnp.zeros((1, 3)), y=jnp.zeros((2, 4)),
                       grid=(2, 3))
    t = jnp.array([0.01, 0.5])
    got = float(flow.icd_loss(Zero(), spec, batch, t, noise, loss="x0"))
    # a zero velocity leaves the whole target velocity eps - x0 as the error
    per_example = [np.mean(np.concatenate([np.asarray(noise[n][b] - layers_[n][b]) ** 2 for n in "xy"]))
                   for b in range(2)]
    want = (0.0025 * per_example[0] + 0.25 * per_example[1]) / 2
    assert got == pytest.approx(want, rel=1e-5)
    plain = float(flow.icd_loss(Zero(), spec, batch, t, noise))
    assert plain == pytest.approx((per_example[0] + per_example[1]) / 2, rel=1e-5)


# ------------------------------------------------------------------ the sampler's schedule (a spy model)
_SEEN: list[np.ndarray] = []


def _record(t):
    _SEEN.append(np.asarray(t))


class Spy(nnx.Module):
    """Records the t it is given; its velocity is `slope * t` for every token."""

    def __init__(self, slope: float):
        self.slope = slope

    def __call__(self, img, img_ids, txt, txt_ids, t, vec, guidance=None, cond_mask=None):
        jax.debug.callback(_record, t, ordered=True)
        return self.slope * jnp.broadcast_to(t[:, None, None], img.shape).astype(jnp.float32)


def _hand_schedule(steps: int, tokens: int) -> np.ndarray:
    """Flux's schedule written out again: linspace(1, 0), shifted by mu(tokens) on (256, 0.5)-(4096, 1.15)."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    t = np.linspace(1.0, 0.0, steps + 1)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, math.exp(mu) / (math.exp(mu) + 1.0 / t - 1.0), 0.0)


@pytest.mark.parametrize("targets", [("x", "y"), ("y",)])
def test_sampler_gives_the_model_t_on_the_schedule_of_all_noisy_tokens(targets):
    """The model sees t (not t_next) at each step, on the schedule for h*w*len(targets) noisy tokens."""
    spec = icd.LayerSpec(targets=targets)
    h, w, steps, bsz = 16, 16, 4, 2
    want = _hand_schedule(steps, h * w * len(targets))
    if targets == ("x", "y"):  # 512 noisy tokens: mu = 0.5 + 0.65 * 256 / 3840, values by hand
        np.testing.assert_allclose(want[1:4], [0.8377995, 0.6325875, 0.3646405], rtol=1e-6)
    cond = jnp.zeros((bsz, h * w, 4))
    txt, vec = jnp.zeros((bsz, 1, 4)), jnp.zeros((bsz, 4))
    outs = {}
    for slope in (0.0, 1.0):
        _SEEN.clear()
        outs[slope] = sampling.sample(Spy(slope), spec, cond, txt, vec, jax.random.key(1), (h, w), steps)
        jax.effects_barrier()
        seen = np.stack(_SEEN)
        assert seen.shape == (steps, bsz)
        np.testing.assert_allclose(seen, np.repeat(want[:steps, None], bsz, 1), rtol=1e-6, atol=1e-7)
    # Euler with v = t: x_0 = noise + sum_i (t_{i+1} - t_i) t_i, the noise being the slope-0 result
    drift = float(np.sum(np.diff(want) * want[:-1]))
    for name in targets:
        np.testing.assert_allclose(np.asarray(outs[1.0][name] - outs[0.0][name]), drift, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets", [("x", "y"), ("y",)])
def test_training_t_is_shifted_for_all_noisy_tokens(targets):
    """flow.sample_noise with shift: uniform t mapped by time_shift(mu(h*w*len(targets))), by hand."""
    spec = icd.LayerSpec(targets=targets)
    h, w, bsz = 16, 16, 64
    batch = flow.Batch(layers={n: jnp.zeros((bsz, h * w, 4)) for n in spec.layers}, txt=jnp.zeros((bsz, 1, 4)),
                       txt_ids=jnp.zeros((1, 3)), y=jnp.zeros((bsz, 4)), grid=(h, w))
    key = jax.random.key(3)
    t, noise = flow.sample_noise(key, spec, batch, "uniform", shift=True)
    u = np.asarray(jax.random.uniform(jax.random.split(key, len(targets) + 1)[0], (bsz,), minval=1e-5, maxval=1.0))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (h * w * len(targets) - 256)
    np.testing.assert_allclose(np.asarray(t), math.exp(mu) / (math.exp(mu) + 1.0 / u - 1.0), rtol=1e-5)
    assert sorted(noise) == sorted(targets)


# ------------------------------------------------------------------ RoPE against diffusers
def test_rope_matches_diffusers_flux_pos_embed():
    """Our rotation tables and their application against diffusers' FluxPosEmbed and apply_rotary_emb.

    Distinct index, row and column values (up to 70) and flux-dev's axes: a wrong theta, a swapped axis
    or a changed frequency exponent moves some entry by O(1)."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, 3, 40), rng.integers(0, 50, 40), rng.integers(0, 70, 40)], -1).astype(np.float32)
    axes = (16, 56, 56)
    cos, sin = (a.numpy() for a in FluxPosEmbed(10_000, list(axes))(torch.from_numpy(ids)))  # [L, 128] each
    pe = np.asarray(layers.embed_nd(jnp.asarray(ids)[None], axes, 10_000))[0]  # [L, 64, 2, 2]
    # angles up to 70 rad in float32 (ours) vs float64 (diffusers): a few 1e-6
    np.testing.assert_allclose(pe[..., 0, 0], cos[:, 0::2], atol=2e-5, rtol=0)
    np.testing.assert_allclose(pe[..., 1, 0], sin[:, 0::2], atol=2e-5, rtol=0)
    np.testing.assert_allclose(pe[..., 0, 1], -sin[:, 0::2], atol=2e-5, rtol=0)
    np.testing.assert_allclose(pe[..., 1, 1], cos[:, 1::2], atol=2e-5, rtol=0)
    x = rng.standard_normal((2, 40, 3, 128)).astype(np.float32)  # [B, L, H, D]
    ours = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pe)[None]))
    ref = apply_rotary_emb(torch.from_numpy(x), (torch.from_numpy(cos), torch.from_numpy(sin)),
                           sequence_dim=1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


# ------------------------------------------------------------------ LoRA init
def test_lora_a_init_bound_is_one_over_sqrt_fan_in():
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's Kaiming-uniform): for 400 inputs the bound is 0.05.

    25,600 draws: P(max |A| <= 0.9 * bound) = 0.9^25600, never."""
    layer = lora.LoRALinear(nnx.Linear(400, 8, rngs=nnx.Rngs(0)), rank=64, alpha=64, rngs=nnx.Rngs(1))
    a = np.abs(np.asarray(layer.lora_a[...]))
    assert a.shape == (400, 64)
    assert a.max() <= 0.05 and a.max() > 0.045
    assert np.count_nonzero(np.asarray(layer.lora_b[...])) == 0


# ------------------------------------------------------------------ blend laws
def test_foreground_alone_backdrops_by_hand():
    """Each task's foreground rendered alone: the backdrop shows where alpha = 0."""
    backdrop = {"xray": 1.0, "glassware": 0.5, "watermark": 0.5, "cell": 0.0, "occlusion": 0.5, "flare": 0.0}
    assert set(backdrop) == set(blend.TASKS)
    clear = np.zeros((2, 2, 4), np.float32)
    clear[..., :3] = 0.3
    for task, value in backdrop.items():
        np.testing.assert_allclose(blend.foreground_alone(task, clear), value, atol=1e-7, err_msg=task)
    half = np.zeros((1, 1, 4), np.float32)
    half[..., :3], half[..., 3] = 0.2, 0.5
    np.testing.assert_allclose(blend.foreground_alone("glassware", half), 0.35, atol=1e-7)  # .5 * .5 + .5 * .2


# ------------------------------------------------------------------ metrics
def test_rmse_masked_with_a_soft_mask_by_hand():
    """RMSEw weighs the squared error by m^2 and divides by C * sum(m): a soft mask tells m from m^2.

    Two pixels, error 0.1 (25.5 on 0-255) in every channel, m = (0.5, 1):
    sqrt(3 * 25.5^2 * (0.25 + 1) / (3 * 1.5)) = 23.278209 (weighting by m would give 25.5)."""
    a = np.zeros((1, 1, 2, 3), np.float32)
    b = a + 0.1
    m = np.array([[[0.5, 1.0]]], np.float32)
    np.testing.assert_allclose(np.asarray(pixel.rmse_masked(a, b, m)), [23.278209], rtol=1e-5)


# ------------------------------------------------------------------ conversion
def test_default_axes_dim_by_hand():
    """BFL files do not store axes_dim: head 128 -> (16, 56, 56); the row axis stays even (RoPE pairs)."""
    assert flux_maps.default_axes_dim(128) == (16, 56, 56)
    assert flux_maps.default_axes_dim(64) == (8, 28, 28)
    assert flux_maps.default_axes_dim(16) == (2, 6, 8)  # rest 14: a row of 7 would split a pair
    assert flux_maps.default_axes_dim(48) == (6, 20, 22)


# ------------------------------------------------------------------ sharding
def test_attention_output_projection_shards_heads_over_tensor():
    """img_attn.proj kernel [heads, embed]: heads on `tensor`, embed on `fsdp` (the actual spec)."""
    mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
    m = nnx.eval_shape(lambda: flux.Flux(flux.PRESETS["tiny"], rngs=nnx.Rngs(0)))
    kernel = m.double_blocks[0].img_attn.proj.kernel
    assert sharding.logical_to_spec(sharding.variable_names(kernel), mesh) == P("tensor", "fsdp")
    qkv = m.double_blocks[0].img_attn.qkv.kernel
    assert sharding.logical_to_spec(sharding.variable_names(qkv), mesh) == P("fsdp", "tensor")


def test_gelu_is_the_tanh_approximation_of_torch():
    """Flux's MLPs use GELU's tanh form; the exact erf form differs by up to ~5e-4, which the parity tests'
    1e-4-of-scale bound absorbs after a few blocks, so it is checked here on its own."""
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), want, atol=2e-6, rtol=0)
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(exact - want).max() > 1e-4  # the two forms are told apart at this tolerance


def test_flux_norm_eps_on_inputs_near_it():
    """Flux's LayerNorm (no affine) and q/k RMSNorm take eps 1e-6 (BFL, diffusers). At the parity fixtures' scale a
    wrong eps (1e-5) moves the output by ~1.5e-5 of its scale, under their 1e-4 bound (docs/testing.md), so it is
    checked here on inputs whose variance is near it: against torch's layer_norm and RMSNorm written out."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((4, 64)) * 3e-3).astype(np.float32)  # mean square ~1e-5
    scale = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    tol = 1e-5  # of the reference's scale
    ln = lambda eps: torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), eps=eps).numpy()  # noqa: E731
    assert rel_err(layers.layer_norm(jnp.asarray(x)), ln(1e-6)) <= tol
    assert rel_err(ln(1e-5), ln(1e-6)) >= 100 * tol  # a wrong eps is told apart by far
    rms = lambda eps: x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps) * scale  # noqa: E731
    norm = layers.RMSNorm(64, layers.Precision())
    norm.scale[...] = jnp.asarray(scale)
    assert rel_err(norm(jnp.asarray(x)), rms(1e-6)) <= tol
    assert rel_err(rms(1e-5), rms(1e-6)) >= 100 * tol
