"""The synthesizer: determinism, captions, integrity, and odd user files."""

import re

import numpy as np
import pytest
from PIL import Image

from dd_jax.data import blend, images, synth

H, W = 48, 64
CAPTION = re.compile(r"^Three sub-images\. <image-1>: .+, <image-2>: .+, "
                     r"<image-3>: The overlapped of <image-1> and <image-2>\.$")


def make_bad_folder(root, good=3):
    """A folder with every kind of odd file the builders must survive."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = lambda h=60, w=80: (rng.random((h, w, 3)) * 255).astype(np.uint8)  # noqa: E731
    for i in range(good):
        Image.fromarray(rgb()).save(root / f"good{i}.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    buf = root / "full.png"
    Image.fromarray(rgb()).save(buf)
    (root / "truncated.png").write_bytes(buf.read_bytes()[:200])  # header fine, data cut
    buf.unlink()
    Image.fromarray(rgb()[..., 0]).save(root / "gray.png")
    Image.fromarray((rng.random((60, 80)) * 65535).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rgb()).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    Image.fromarray(rgb()).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.concatenate([rgb(), (rng.random((60, 80, 1)) * 255).astype(np.uint8)], -1)
    Image.fromarray(rgba).save(root / "alpha.png")
    Image.fromarray(rgb(10, 12)).save(root / "tiny.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("task", blend.TASKS)
def test_sample_is_deterministic_and_consistent(task):
    s = synth.Synthesizer(task, H, W, seed=3)
    a, b = s.sample(5, "train"), synth.Synthesizer(task, H, W, seed=3).sample(5, "train")
    for k in ("composite", "background", "foreground"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.caption == b.caption and CAPTION.match(a.caption), a.caption
    assert a.composite.shape == (H, W, 3) and a.background.shape == (H, W, 3)
    assert a.foreground.shape == (H, W, 4) and a.foreground.dtype == np.uint8
    assert a.foreground[..., 3].max() > 0  # there is a foreground
    c = s.sample(6, "train")
    assert not np.array_equal(a.composite, c.composite)
    t = s.sample(5, "test")
    assert not np.array_equal(a.background, t.background)
    # the stored layers recompose to the stored composite under the task's law
    re_c = blend.composite(task, a.foreground / 255.0, a.background / 255.0) * 255.0
    assert np.abs(re_c - a.composite).max() <= 2.0


def test_watermark_size_and_opacity_follow_the_appendix():
    s = synth.Synthesizer("watermark", 512, 512, seed=0)
    for i in range(4):
        fg = s.sample(i).foreground
        alpha = fg[..., 3] / 255.0
        assert 0.0 < alpha.max() <= 0.25 + 1 / 255
        ys, xs = np.nonzero(alpha > 0.02)
        assert ys.max() - ys.min() >= 40 or xs.max() - xs.min() >= 96  # a large mark


def test_bad_background_files_are_converted_or_skipped(tmp_path):
    folder = make_bad_folder(tmp_path / "bg")
    s = synth.Synthesizer("watermark", H, W, backgrounds=str(folder), seed=0)
    report = s.reports()["backgrounds"]
    events = []
    for i in range(40):
        smp = s.sample(i)
        assert smp.background.shape == (H, W, 3)
        events += smp.events
    report.merge(events)
    counts = report.counts()
    assert counts["files"] == 11
    assert counts["skipped"]["corrupt"] == 2  # unreadable header + truncated data
    assert counts["skipped"]["tiny"] == 1
    for kind in ("grayscale", "16bit", "palette", "cmyk", "rgba"):
        assert counts["converted"].get(kind) == 1, (kind, counts)


def test_loaders_convert_modes(tmp_path):
    folder = make_bad_folder(tmp_path / "x")
    ev = []
    for name in ("gray.png", "deep16.png", "palette.png", "cmyk.jpg", "alpha.png", "good0.jpg"):
        a = images.load_rgb(str(folder / name), ev)
        assert a.dtype == np.uint8 and a.shape == (60, 80, 3), name
    assert images.load_rgb(str(folder / "deep16.png"), []).max() > 200  # scaled, not clipped
    assert images.load_rgb(str(folder / "corrupt.jpg"), ev) is None
    assert images.load_rgb(str(folder / "tiny.png"), ev, min_side=32) is None
    assert images.load_rgba(str(folder / "alpha.png"), []).shape == (60, 80, 4)
    ev = []
    assert images.load_rgba(str(folder / "good0.jpg"), ev) is None and ev[-1][1] == "no_alpha"
    em = images.load_rgba(str(folder / "good0.jpg"), [], emission=True)  # flare on black
    ref = np.asarray(Image.open(folder / "good0.jpg"), np.float32)
    np.testing.assert_allclose(em[..., :3] / 255.0 * em[..., 3:] / 255.0 * 255.0, ref, atol=2.0)


@pytest.mark.parametrize("task", ["watermark", "flare", "glassware"])
def test_foreground_folder(tmp_path, task):
    fgdir = tmp_path / "fg"
    fgdir.mkdir()
    rng = np.random.default_rng(1)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)
    Image.fromarray(rgba).save(fgdir / "logo.png")
    (fgdir / "logo.txt").write_text("a red square logo\n")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(fgdir / "flare.jpg")
    s = synth.Synthesizer(task, H, W, foregrounds=str(fgdir), seed=0)
    seen = set()
    for i in range(12):
        smp = s.sample(i)
        assert smp.foreground[..., 3].max() > 0
        seen.add("red square" in smp.caption)
        re_c = blend.composite(task, smp.foreground / 255.0, smp.background / 255.0) * 255.0
        assert np.abs(re_c - smp.composite).max() <= 2.0
    assert True in seen
    if task == "watermark":
        assert smp.foreground[..., 3].max() <= 0.25 * 255 + 1


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        synth.Synthesizer("flare", H, W, backgrounds=str(tmp_path))
