"""The "photo" data style: overlays at a photo's pixel scale, near-native views, held-out photos and fonts."""

from __future__ import annotations

import numpy as np
import pytest

from dd_jax.data import backgrounds, fg_layers, pipeline, raster, synth


def test_photo_watermarks_cover_every_layout_and_the_opacity_range():
    seen, peaks = set(), []
    for i in range(60):
        rgba, desc = fg_layers.watermark_photo(np.random.default_rng(i), 96, 128)
        assert rgba.shape == (96, 128, 4) and rgba.dtype == np.float32
        seen |= {k for k, words in (("tiled", "repeated diagonal"), ("corner", "corner logo"),
                                    ("centre", "centred logo"), ("line", "copyright line"),
                                    ("signature", "signature"), ("text", "large text")) if words in desc}
        peaks.append(float(rgba[..., 3].max()))
    assert seen == set(fg_layers.PHOTO_MARKS)
    peaks = np.array(peaks)
    assert peaks.max() <= 0.8 + 1e-6  # never more opaque than 0.8
    assert (peaks > 0).mean() > 0.9  # a mark is almost always in the window
    assert peaks.max() > 0.6 and np.median(peaks[peaks > 0]) < 0.5  # strong ones exist, faint ones dominate


def test_training_never_draws_the_held_out_fonts(monkeypatch):
    held = raster.held_out_fonts()
    if not held:
        pytest.skip("known: this machine has no DejaVu Serif Condensed font (the held-out face)")
    assert not set(held) & set(raster.training_fonts())
    used = []
    real = raster.Font.__init__

    def spy(self, path, size):
        used.append(path)
        real(self, path, size)

    monkeypatch.setattr(raster.Font, "__init__", spy)
    for i in range(40):
        fg_layers.watermark_photo(np.random.default_rng(i), 64, 64)
    assert used and not set(used) & set(held)


def test_photo_style_leaves_out_the_held_out_photos():
    classic = synth.Synthesizer("watermark", 64, 64).bg_source.names
    photo = synth.Synthesizer("watermark", 64, 64, style="photo").bg_source.names
    assert set(backgrounds.HELD_OUT_PHOTOS) <= set(classic)
    assert set(photo) == set(classic) - set(backgrounds.HELD_OUT_PHOTOS)
    with pytest.raises(ValueError, match="unknown style"):
        synth.Synthesizer("watermark", 64, 64, style="painting")


def test_native_views_keep_the_photo_scale():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3))  # +1 grey level per pixel
    rng = np.random.default_rng(0)
    native = backgrounds.random_view(ramp, rng, 64, 64, jitter=False, native=(1.0, 1.0))
    shrunk = backgrounds.random_view(ramp, rng, 64, 64, jitter=False, min_scale=1.0)
    slope = lambda v: np.abs(np.diff(v[32, :, 0] * 255.0)).mean()
    assert slope(native) == pytest.approx(1.0, abs=0.05)
    assert slope(shrunk) == pytest.approx(4.0, abs=0.2)


def test_native_crop_is_a_window_of_the_record():
    img = np.random.default_rng(1).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pipeline._fit(img, 64, 64, 0.0, 1.0, "native"), img[:64, 32:96])
    np.testing.assert_array_equal(pipeline._fit(img, 64, 64, 1.0, 0.0, "native"), img[64:, :64])
    assert not np.array_equal(pipeline._fit(img, 64, 64, 0.0, 0.0, "resize"), img[:64, :64])  # resized first
    small = img[:48, :48]  # smaller than the window: resized to cover, as before
    assert pipeline._fit(small, 64, 64, 0.5, 0.5, "native").shape == (64, 64, 3)
    with pytest.raises(ValueError, match="crop"):
        pipeline.Prepare(64, 64, True, crop="zoom")


def test_photo_samples_recompose_and_differ_from_classic():
    for task in ("watermark", "flare", "occlusion"):
        s = synth.Synthesizer(task, 64, 64, seed=3, style="photo").sample(0)
        c = synth.Synthesizer(task, 64, 64, seed=3).sample(0)
        assert s.composite.shape == (64, 64, 3) and s.foreground.shape == (64, 64, 4)
        assert not np.array_equal(s.composite, c.composite)
