"""Batch decomposition CLI: any size, odd files, RGBA foregrounds, fixed-shape batches."""

import os

import numpy as np
import pytest
from PIL import Image

import train_helpers as th
from dd_jax import decompose, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = th.make_dataset(tmp_path_factory.mktemp("data"), train=8, test=0)
    c = th.small_config(data, steps=2)
    return train.train(c, str(tmp_path_factory.mktemp("run")))["export"]


def test_folder_of_mixed_inputs(model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8)).save(src / "watermark_a.png")
    Image.fromarray(rng.integers(0, 255, (80, 100, 4), np.uint8), "RGBA").save(src / "xray_b.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8), "L").save(src / "watermark_gray.jpg")
    (src / "watermark_broken.png").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(src / "holiday.png")  # no task in the name
    out = tmp_path / "out"
    assert decompose.main(["--input", str(src), "--output", str(out), "--checkpoint", model_dir,
                           "--batch-size", "2", "--steps", "2"]) == 0
    files = sorted(os.listdir(out))
    assert files == sorted(f"{s}_{k}.png" for s in ("watermark_a", "xray_b", "watermark_gray")
                           for k in ("background", "foreground"))
    bg = Image.open(out / "watermark_a_background.png")
    assert bg.size == (53, 37) and bg.mode == "RGB"
    assert Image.open(out / "watermark_a_foreground.png").mode == "RGBA"  # alpha-over layer
    assert Image.open(out / "xray_b_foreground.png").mode == "RGB"  # transmittance on white
    assert Image.open(out / "xray_b_background.png").size == (100, 80)


def test_task_flag_and_samples(model_dir, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(img)
    out = tmp_path / "out"
    assert decompose.main(["--input", str(img), "--output", str(out), "--checkpoint", model_dir, "--task", "cell",
                           "--num-samples", "2", "--steps", "2", "--seed", "3"]) == 0
    assert sorted(os.listdir(out)) == ["photo_s0_background.png", "photo_s0_foreground.png",
                                       "photo_s1_background.png", "photo_s1_foreground.png"]
    a = np.asarray(Image.open(out / "photo_s0_background.png"))
    b = np.asarray(Image.open(out / "photo_s1_background.png"))
    assert not np.array_equal(a, b)  # different noise per sample


def test_only_bad_inputs_fail(model_dir, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"junk")
    assert decompose.main(["--input", str(bad), "--output", str(tmp_path / "o"), "--checkpoint", model_dir,
                           "--task", "cell"]) == 1
    assert decompose.main(["--input", str(bad), "--output", str(tmp_path / "o"), "--checkpoint",
                           str(tmp_path / "nowhere")]) == 2


def test_alpha_estimate_inverts_alpha_over():
    rng = np.random.default_rng(1)
    bg = rng.uniform(0, 1, (8, 8, 3))
    a = rng.uniform(0, 1, (8, 8, 3))
    alpha = rng.uniform(0, 0.5, (8, 8, 1))
    comp = (1 - alpha) * bg + alpha * a
    render = (1 - alpha) * 0.5 + alpha * a
    est = decompose.estimate_alpha(render, comp, bg, 0.5)
    mask = np.sum((0.5 - bg) ** 2, -1, keepdims=True) > 0.05  # alpha is observable where B differs from the grey
    np.testing.assert_allclose(est[mask], alpha[mask], atol=1e-6)
