"""ICD token layout and LPEC position ids."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close

from dd_jax import icd
from dd_jax.models import flux


def _rows(ids):
    return {tuple(r) for r in np.asarray(ids).tolist()}


@pytest.mark.parametrize("offset", icd.OFFSETS)
def test_lpec_ids(offset):
    spec = icd.LayerSpec(targets=("x", "y"), lpec=True, offset=offset)
    ids = icd.layer_ids(spec, 3, 4)
    np.testing.assert_array_equal(ids["z"], ids["y"])  # cloned: identical, token for token
    np.testing.assert_array_equal(ids["z"], icd.grid_ids(3, 4))  # (0, row, col)
    assert not _rows(ids["x"]) & _rows(ids["z"])  # x disjoint from z and y
    assert len(_rows(ids["x"])) == 12  # and unique within itself
    seq = icd.position_ids(spec, 3, 4)
    assert seq.shape == (36, 3)
    np.testing.assert_array_equal(seq[:12], ids["z"])
    np.testing.assert_array_equal(seq[12:24], ids["x"])
    np.testing.assert_array_equal(seq[24:], ids["y"])


@pytest.mark.parametrize("offset", icd.OFFSETS)
def test_ablation_gives_every_layer_its_own_ids(offset):
    spec = icd.LayerSpec(targets=("x", "y"), lpec=False, offset=offset)
    ids = icd.layer_ids(spec, 2, 5)
    for a, b in itertools.combinations(spec.layers, 2):
        assert not _rows(ids[a]) & _rows(ids[b]), (a, b)


def test_offsets_match_kontext_and_ominicontrol():
    x_index = icd.layer_ids(icd.LayerSpec(offset="index"), 2, 3)["x"]
    assert set(x_index[:, 0]) == {1.0}  # Kontext-style (1, row, col)
    x_spatial = icd.layer_ids(icd.LayerSpec(offset="spatial"), 2, 3)["x"]
    assert set(x_spatial[:, 0]) == {0.0} and x_spatial[:, 2].min() == 3  # columns shifted by the width


def test_removal_layout_and_validation():
    spec = icd.LayerSpec(targets=("y",))
    ids = icd.layer_ids(spec, 2, 2)
    np.testing.assert_array_equal(ids["z"], ids["y"])
    with pytest.raises(ValueError):
        icd.LayerSpec(targets=())
    with pytest.raises(ValueError):
        icd.LayerSpec(targets=("x",), cloned=("y",))
    with pytest.raises(ValueError):
        icd.LayerSpec(offset="diagonal")


def test_sequence_round_trip():
    spec = icd.LayerSpec()
    rng = np.random.default_rng(0)
    layers = {n: jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32) for n in spec.layers}
    img, ids, noisy, cond = icd.build_sequence(spec, layers, 2, 3)
    assert img.shape == (2, 18, 8) and ids.shape == (18, 3)
    assert cond[:6].all() and not cond[6:].any() and (noisy == ~cond).all()
    back = icd.split_layers(spec, img, 6, include_condition=True)
    for n in spec.layers:
        np.testing.assert_array_equal(back[n], layers[n])
    assert set(icd.split_layers(spec, img, 6)) == {"x", "y"}
    with pytest.raises(KeyError):
        icd.build_sequence(spec, {"z": layers["z"]}, 2, 3)
    with pytest.raises(ValueError):
        icd.build_sequence(spec, layers, 3, 3)


def test_pack_matches_bfl_rearrange():
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((2, 4, 6, 3)).astype(np.float32)  # NHWC
    packed = np.asarray(icd.pack(jnp.asarray(lat)))
    # BFL: NCHW "b c (h ph) (w pw) -> b (h w) (c ph pw)", written out by hand
    nchw = lat.transpose(0, 3, 1, 2)
    ref = np.zeros((2, 2 * 3, 3 * 4), np.float32)
    for h, w, c, ph, pw in itertools.product(range(2), range(3), range(3), range(2), range(2)):
        ref[:, h * 3 + w, c * 4 + ph * 2 + pw] = nchw[:, c, 2 * h + ph, 2 * w + pw]
    np.testing.assert_array_equal(packed, ref)
    np.testing.assert_array_equal(np.asarray(icd.unpack(jnp.asarray(packed), 4, 6)), lat)
    with pytest.raises(ValueError):
        icd.pack(jnp.zeros((1, 3, 4, 2)))


def test_condition_tokens_modulated_as_t0():
    model = flux.Flux(flux.PRESETS["tiny"], rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    img = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
    ids = jnp.asarray(icd.grid_ids(2, 4))
    txt = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    txt_ids = jnp.zeros((3, 3))
    vec = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    t = jnp.array([0.3, 0.8])
    g = jnp.array([3.5, 3.5])
    plain = model(img, ids, txt, txt_ids, t, vec, g)
    none = model(img, ids, txt, txt_ids, t, vec, g, cond_mask=jnp.zeros(8, bool))
    assert_close(none, plain, 1e-5, "no condition tokens")
    # every image token a condition token: the image stream sees t = 0 (text keeps t)
    all_c = model(img, ids, txt, txt_ids, t, vec, g, cond_mask=jnp.ones(8, bool))
    assert np.abs(np.asarray(all_c - plain)).max() > 1e-3
    mixed = model(img, ids, txt, txt_ids, t, vec, g, cond_mask=jnp.arange(8) < 4)
    assert not np.allclose(mixed, plain, atol=1e-4) and not np.allclose(mixed, all_c, atol=1e-4)
    # at t = 0 the condition vector is the ordinary one: masking changes nothing
    t0 = jnp.zeros(2)
    assert_close(model(img, ids, txt, txt_ids, t0, vec, g, cond_mask=jnp.arange(8) < 4),
                 model(img, ids, txt, txt_ids, t0, vec, g), 1e-5, "masked at t = 0")
