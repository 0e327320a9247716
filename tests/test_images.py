"""One image reader for the data builder and decompose: bit depth, float images, EXIF, refusals."""

import numpy as np
import pytest
from PIL import Image

from dd_jax import decompose
from dd_jax.data import images

ORIENTATION = 0x0112


def gray16(path, value, spot=None):
    a = np.full((20, 30), value, np.uint16)
    if spot is not None:
        a[0, 0] = spot
    Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_is_scaled_by_bit_depth_not_content(tmp_path, ext):
    plain = gray16(tmp_path / f"plain.{ext}", 250)
    spot = gray16(tmp_path / f"spot.{ext}", 250, spot=300)
    for path in (plain, spot):
        rgb = decompose.read_rgb(str(path))
        assert rgb.shape == (20, 30, 3) and rgb.dtype == np.float32
        np.testing.assert_allclose(rgb[5, 5], 250 / 65535, rtol=1e-6)  # not 0.98, not 0.004
        ev = []
        assert images.load_rgb(str(path), ev).max() <= 1  # 250/65535 of full scale in 8 bits
        assert ("converted", "16bit", str(path)) in ev
    full = gray16(tmp_path / f"full.{ext}", 65535)
    assert decompose.read_rgb(str(full)).min() == 1.0
    assert images.load_rgb(str(full), []).min() == 255


def test_float_tiff_in_unit_range_reads_as_is(tmp_path):
    a = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    Image.fromarray(a).save(tmp_path / "f.tif")
    rgb = decompose.read_rgb(str(tmp_path / "f.tif"))
    np.testing.assert_allclose(rgb[..., 0], a, atol=1e-7)  # not black
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    u8 = images.load_rgb(str(tmp_path / "f.tif"), [])
    np.testing.assert_array_equal(u8[..., 1], np.rint(a * 255).astype(np.uint8))


@pytest.mark.parametrize("values", [(0.0, 2.5), (-0.5, 0.5), (0.0, np.nan)])
def test_float_outside_unit_range_is_refused_with_a_reason(tmp_path, values):
    a = np.full((20, 30), 0.25, np.float32)
    a[0, :2] = values
    Image.fromarray(a).save(tmp_path / "f.tif")
    with pytest.raises(images.ImageError, match=r"outside \[0, 1\]|not finite"):
        decompose.read_rgb(str(tmp_path / "f.tif"))
    ev = []
    assert images.load_rgb(str(tmp_path / "f.tif"), ev) is None
    assert ev[-1][0] == "skipped" and ev[-1][1] == "float_range"


def test_32bit_int_outside_its_range_is_refused(tmp_path):
    a = np.full((20, 30), 100, np.int32)
    a[0, 0] = -4
    Image.fromarray(a).save(tmp_path / "i.tif")
    with pytest.raises(images.ImageError, match="negative"):
        decompose.read_rgb(str(tmp_path / "i.tif"))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white; orientation 6 = stored rotated: display rotates 90 degrees clockwise
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[ORIENTATION] = 6
    path = tmp_path / f"o.{fmt}"
    im.save(path, exif=exif, **({"quality": 95} if fmt == "jpeg" else {}))
    rgb = decompose.read_rgb(str(path))
    assert rgb.shape == (40, 20, 3)
    assert rgb[:15].mean() > 0.9 and rgb[25:].mean() < 0.1  # the white half is now on top
    assert images.load_rgb(str(path), []).shape == (40, 20, 3)


def test_alpha_is_flattened_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb = decompose.read_rgb(str(tmp_path / "a.png"))
    np.testing.assert_allclose(rgb[0, 0], [1, 0, 0])
    np.testing.assert_allclose(rgb[9, 9], [1, 1, 1])


def test_unreadable_files_are_refused_with_a_reason(tmp_path):
    (tmp_path / "noise.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(images.ImageError, match="not an image"):
        decompose.read_rgb(str(tmp_path / "noise.png"))
    a = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match="truncated or corrupt"):
        decompose.read_rgb(str(tmp_path / "cut.png"))
    with pytest.raises(images.ImageError, match="no such file"):
        decompose.read_rgb(str(tmp_path / "missing.png"))
    big = Image.new("L", (decompose.MAX_SIDE + 1, 1))
    big.save(tmp_path / "wide.png")
    with pytest.raises(images.ImageError, match="larger than"):
        decompose.read_rgb(str(tmp_path / "wide.png"))


def test_decompression_bombs_are_refused_not_fatal(tmp_path, monkeypatch):
    """Pillow raises DecompressionBombError (not an OSError) past 2x MAX_IMAGE_PIXELS when it opens a file:
    read_rgb gives an ImageError, and the builders' load_rgb skips the file instead of stopping."""
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(images.ImageError, match="too many pixels"):
        images.read_rgb(str(tmp_path / "bomb.png"), max_side=50)
    events = []
    assert images.load_rgb(str(tmp_path / "bomb.png"), events) is None
    assert events == [("skipped", "too_large", str(tmp_path / "bomb.png"))]
