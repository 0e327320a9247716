"""The six blend laws against the paper's formulas (DiffDecompose sec. 3.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax.data import blend

TASKS = blend.TASKS


def _random(seed, shape=(7, 9)):
    rng = np.random.default_rng(seed)
    fg = rng.random(shape + (4,), dtype=np.float32)
    bg = rng.random(shape + (3,), dtype=np.float32)
    return fg, bg


def _paper(task, fg, bg):
    """Straight transcriptions of the paper's formulas (0-255 where it uses 255)."""
    a, al = fg[..., :3], fg[..., 3:]
    if task == "xray":  # I = (1 - a) B + a (A/255 * B/255 * 255), on 0..255
        A, B = a * 255.0, bg * 255.0
        return ((1 - al) * B + al * (A / 255.0 * B / 255.0 * 255.0)) / 255.0
    if task == "glassware":  # I = A*B if B < 0.5 else 1-(1-A)(1-B), where the glass is
        out = np.empty_like(bg)
        for idx in np.ndindex(bg.shape[:-1]):
            b, x = bg[idx], a[idx]
            dark = 0.299 * b[0] + 0.587 * b[1] + 0.114 * b[2] < 0.5
            g = x * b if dark else 1 - (1 - x) * (1 - b)
            out[idx] = (1 - al[idx]) * b + al[idx] * g
        return out
    if task == "watermark":  # paper: I = (1 - a_p) A + a_p B with a_p the transparency
        a_p = 1.0 - al
        return (1 - a_p) * a + a_p * bg
    if task == "cell":  # I = A_alpha + B (A_alpha premultiplied), clipped to the range
        return np.minimum(al * a + bg, 1.0)
    if task == "occlusion":  # scattering model: J t + L (1 - t), t = 1 - alpha
        t = 1.0 - al
        return bg * t + a * (1 - t)
    if task == "flare":  # light adds in linear space (gamma 2.2)
        return np.minimum(bg**2.2 + (al * a) ** 2.2, 1.0) ** (1 / 2.2)
    raise AssertionError(task)


@pytest.mark.parametrize("task", TASKS)
def test_law_matches_paper_formula(task):
    for seed in range(3):
        fg, bg = _random(seed)
        got = blend.composite(task, fg, bg)
        assert got.shape == bg.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, _paper(task, fg, bg), atol=2e-6)
        assert got.min() >= 0.0 and got.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("task", TASKS)
def test_zero_alpha_leaves_background(task):
    fg, bg = _random(5)
    fg[..., 3] = 0.0
    np.testing.assert_allclose(blend.composite(task, fg, bg), bg, atol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_jit_matches_numpy_and_grads_are_finite(task):
    fg, bg = _random(6)
    f = jax.jit(lambda x, y: blend.composite(task, x, y))
    out = f(jnp.asarray(fg), jnp.asarray(bg))
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), blend.composite(task, fg, bg), atol=1e-5)
    g = jax.grad(lambda x, y: blend.composite(task, x, y).sum(), argnums=(0, 1))(
        jnp.asarray(fg), jnp.asarray(bg))
    assert all(bool(jnp.isfinite(x).all()) for x in g)


@pytest.mark.parametrize("task", TASKS)
def test_foreground_alone_recomposes(task):
    fg, bg = _random(7)
    alone = blend.foreground_alone(task, fg)
    assert alone.shape == bg.shape and alone.min() >= 0 and alone.max() <= 1
    alpha = fg[..., 3:] if task in blend.RECOMPOSE_NEEDS_ALPHA else None
    np.testing.assert_allclose(blend.recompose(task, alone, bg, alpha),
                               blend.composite(task, fg, bg), atol=2e-5)
    if alpha is not None:
        with pytest.raises(ValueError):
            blend.recompose(task, alone, bg)
    # the alone rendering is the law over the task's backdrop where that is what it means
    if task != "glassware":
        backdrop = np.full_like(bg, blend.ALONE_BACKDROP[task])
        np.testing.assert_allclose(alone, blend.composite(task, fg, backdrop), atol=1e-4)
    # and it can be turned back into the RGBA layer given alpha
    back = blend.rgba_from_alone(task, alone, fg[..., 3:])
    np.testing.assert_allclose(blend.foreground_alone(task, back), alone, atol=2e-5)


def test_alone_backdrops():
    x = np.zeros((2, 2, 4), np.float32)  # nothing there
    for task in TASKS:
        np.testing.assert_allclose(blend.foreground_alone(task, x), blend.ALONE_BACKDROP[task], atol=1e-6)


def test_emission_and_transmittance_layers():
    rng = np.random.default_rng(0)
    light = rng.random((5, 6, 3), dtype=np.float32) * 0.8
    light[0, 0] = 0.0
    rgba = blend.emission_to_rgba(light)
    np.testing.assert_allclose(rgba[..., 3:] * rgba[..., :3], light, atol=1e-6)
    t = 1.0 - rng.random((5, 6, 3), dtype=np.float32) * 0.9
    rgba = blend.transmittance_to_rgba(t)
    np.testing.assert_allclose((1 - rgba[..., 3:]) + rgba[..., 3:] * rgba[..., :3], t, atol=1e-5)
    assert rgba.min() >= 0 and rgba.max() <= 1


def test_unknown_task():
    with pytest.raises(ValueError):
        blend.composite("nope", np.zeros((1, 1, 4)), np.zeros((1, 1, 3)))
    assert blend.TASKS == ("xray", "glassware", "watermark", "cell", "occlusion", "flare")
