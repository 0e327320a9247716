"""Batch decomposition CLI and dd_jax.inference: any size, tiles, odd files, RGBA foregrounds, auto task."""

import os

import fake_model as fake_helper
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th
from fake_model import FakeSystem
from PIL import Image

from dd_jax import decompose, inference, sampling, train
from dd_jax.data import blend


def outputs(folder) -> list[str]:
    """The files of an output folder but the run's JSON sidecar (tests/test_layers_output.py checks it)."""
    return sorted(f for f in os.listdir(folder) if not f.startswith(decompose.SIDECAR_PREFIX))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = th.make_dataset(tmp_path_factory.mktemp("data"), train=8, test=0)
    c = th.small_config(data, steps=2)
    return train.train(c, str(tmp_path_factory.mktemp("run")))["export"]


def test_folder_of_mixed_inputs(model_dir, tmp_path, monkeypatch, capsys):
    shapes = []
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda tr, spec, cond, *a, **k: shapes.append(cond.shape) or
                        real(tr, spec, cond, *a, **k))
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8)).save(src / "watermark_a.png")
    Image.fromarray(rng.integers(0, 255, (80, 100, 4), np.uint8), "RGBA").save(src / "xray_b.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8), "L").save(src / "watermark_gray.jpg")
    Image.fromarray(rng.integers(0, 255, (3, 130, 3), np.uint8)).save(src / "cell_wide.png")
    (src / "watermark_broken.png").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(src / "holiday.png")  # no task in the name
    out = tmp_path / "out"
    assert decompose.main(["--input", str(src), "--output", str(out), "--checkpoint", model_dir,
                           "--batch-size", "2", "--steps", "2"]) == 1  # one input skipped
    err = capsys.readouterr().err
    files = outputs(out)
    stems = ("watermark_a", "xray_b", "watermark_gray", "cell_wide", "holiday")
    assert files == sorted(f"{s}_{k}.png" for s in stems for k in ("background", "foreground"))
    bg = Image.open(out / "watermark_a_background.png")
    assert bg.size == (53, 37) and bg.mode == "RGB"
    for stem, size in (("watermark_a", (53, 37)), ("xray_b", (100, 80)), ("cell_wide", (130, 3)),
                       ("holiday", (32, 32))):
        fg = Image.open(out / f"{stem}_foreground.png")
        assert fg.mode == "RGBA" and fg.size == size  # every foreground: RGBA at the input's size
    assert Image.open(out / "xray_b_background.png").size == (100, 80)
    assert "holiday.png (32x32): task " in err and "chosen automatically" in err  # the choice is printed
    assert "watermark_a.png (53x37): task watermark (file name)" in err
    assert "skipping" in err and "watermark_broken" in err
    assert "recomposition RMSE" in err
    assert len(set(shapes)) == 1  # tiles of every size, auto-task probes included: one compiled shape


def test_task_flag_and_samples(model_dir, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(img)
    out = tmp_path / "out"
    assert decompose.main(["--input", str(img), "--output", str(out), "--checkpoint", model_dir, "--task", "cell",
                           "--num-samples", "2", "--steps", "2", "--seed", "3"]) == 0
    assert outputs(out) == ["photo_s0_background.png", "photo_s0_foreground.png",
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


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_must_be_positive(model_dir, tmp_path, steps):
    """Defect 9: --steps 0 meant the config's 2, --steps -3 failed inside the sampler."""
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit) as e:
        decompose.main(["--input", str(img), "--output", str(tmp_path / "o"), "--checkpoint", model_dir,
                        "--steps", steps, "--task", "cell"])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "o")


def test_same_stems_get_distinct_names(model_dir, tmp_path):
    """Defect 2: a/xray_1.png, a/xray_1.jpg and b/xray_1.jpg wrote one pair, clobbering each other."""
    rng = np.random.default_rng(4)
    for rel in ("a/xray_1.png", "a/xray_1.jpg", "b/xray_1.jpg", "b/cell_2.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / rel)
    out = tmp_path / "out"
    assert decompose.main(["--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out),
                           "--checkpoint", model_dir, "--steps", "1"]) == 0
    stems = ("xray_1_png", "a_xray_1_jpg", "b_xray_1_jpg", "cell_2")
    assert outputs(out) == sorted(f"{s}_{k}.png" for s in stems for k in ("background", "foreground"))


def test_existing_files_are_not_written_over(model_dir, tmp_path, capsys):
    """Defect 2: --output equal to the input folder replaced the user's *_background.png."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(src / "xray_1.png")
    mine = src / "xray_1_background.png"
    mine.write_bytes(b"the user's own file")
    args = ["--output", str(src), "--checkpoint", model_dir, "--steps", "1"]
    assert decompose.main(["--input", str(src / "xray_1.png")] + args) == 2
    assert "xray_1_background.png exists" in capsys.readouterr().err and mine.read_bytes() == b"the user's own file"
    assert sorted(os.listdir(src)) == ["xray_1.png", "xray_1_background.png"]
    # the folder as input: the user's file is an input too, never written over, even with --overwrite
    assert decompose.main(["--input", str(src), "--overwrite"] + args) == 2
    assert "over an input" in capsys.readouterr().err and mine.read_bytes() == b"the user's own file"
    # --overwrite replaces outputs (not inputs)
    assert decompose.main(["--input", str(src / "xray_1.png"), "--overwrite"] + args) == 0
    assert Image.open(mine).size == (16, 16)


def test_output_folder_is_checked_before_the_model_runs(model_dir, tmp_path, monkeypatch, capsys):
    """Defect 8: an --output that is a file or under one was a traceback; a read-only one failed only after
    the model had run."""
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    monkeypatch.setattr(decompose.checkpoints, "load_trained", lambda *a, **k: pytest.fail("the model was loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = decompose.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # as a read-only folder answers a user that is not root
        if os.path.realpath(dir) == os.path.realpath(ro):
            raise PermissionError(13, "Permission denied", dir)
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(decompose.tempfile, "mkstemp", mkstemp)
    for output, word in ((afile, "not a folder"), (afile / "sub", "is a file"), (ro, "not writable"),
                         (ro / "new", "not writable")):
        assert decompose.main(["--input", str(img), "--output", str(output), "--task", "cell"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert os.listdir(ro) == [] and afile.read_text() == "x"


def test_disk_full_while_writing_stops_clearly_and_keeps_what_was_written(model_dir, tmp_path, monkeypatch, capsys):
    """An injected OSError(ENOSPC) at the third file: exit 2 with one line, no partial file, the two files
    written before and the folder's other files kept."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("xray_1.png", "xray_2.png", "xray_3.png"):
        Image.fromarray(np.full((16, 16, 3), 60, np.uint8)).save(src / name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    real, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")  # a partial write, then the disk is full
            raise OSError(28, "No space left on device", fp)
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    assert decompose.main(["--input", str(src), "--output", str(out), "--checkpoint", model_dir, "--steps", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "no space left on device" in err[0] and "2 file(s) written before" in err[0], err
    assert sorted(os.listdir(out)) == ["notes.txt", "xray_1_background.png", "xray_1_foreground.png"]
    assert (out / "notes.txt").read_text() == "kept"
    monkeypatch.undo()
    for f in ("xray_1_background.png", "xray_1_foreground.png"):
        assert Image.open(out / f).size == (16, 16)


def test_alpha_estimate_inverts_alpha_over():
    rng = np.random.default_rng(1)
    bg = rng.uniform(0, 1, (8, 8, 3))
    a = rng.uniform(0, 1, (8, 8, 3))
    alpha = rng.uniform(0, 0.5, (8, 8, 1))
    comp = (1 - alpha) * bg + alpha * a
    render = (1 - alpha) * 0.5 + alpha * a
    est = blend.estimate_alpha(render, comp, bg, 0.5)
    mask = np.sum((0.5 - bg) ** 2, -1, keepdims=True) > 0.05  # alpha is observable where B differs from the grey
    np.testing.assert_allclose(est[mask], alpha[mask], atol=1e-6)


# ------------------------------------------------------------------ dd_jax.inference: tiling, batches, auto task
@pytest.fixture
def fake_model(monkeypatch):
    return fake_helper.patch(monkeypatch)


def untiled(img, task):
    out = fake_helper.pointwise(img[None] * 2 - 1, [blend.TASK_INDEX[task]])
    return {k: np.clip((v[0] + 1) / 2, 0, 1) for k, v in out.items()}


SIZES = [(1, 1), (1, 37), (15, 16), (16, 16), (17, 33), (100, 7), (203, 64), (40, 250), (16, 61)]


@pytest.mark.parametrize("overlap", [0, 4, 7])
def test_tiles_reproduce_a_pointwise_model_exactly(fake_model, overlap):
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 1, (h, w, 3)).astype(np.float32) for h, w in SIZES]
    tasks = [blend.TASKS[i % 6] for i in range(len(images))]
    outs = inference.decompose_images(FakeSystem(), images, tasks, steps=1, key=jax.random.key(0), batch_size=5,
                                      overlap=overlap)
    for img, t, out in zip(images, tasks, outs):
        want = untiled(img, t)
        assert out.background.shape == img.shape and out.foreground.shape == img.shape
        np.testing.assert_allclose(out.background, want["y"], atol=2e-6)
        np.testing.assert_allclose(out.foreground, want["x"], atol=2e-6)
    assert {c[0].shape for c in fake_model} == {(5, 16, 16, 3)}  # one shape for every size: one compilation
    n_tiles = sum(inference.tile_count(h, w, (16, 16), overlap) for h, w in SIZES)
    assert len(fake_model) == -(-n_tiles // 5)


def test_constant_change_is_seamless(monkeypatch):
    monkeypatch.setattr(inference.system_lib, "decompose",
                        lambda s, comp, *a, **k: {"y": comp * 0 - 0.2, "x": comp * 0})
    img = np.zeros((70, 90, 3), np.float32)
    out = inference.decompose_images(FakeSystem(), [img], ["cell"], steps=1, key=jax.random.key(0))[0]
    np.testing.assert_allclose(out.background, 0.4, atol=1e-6)


def test_tile_geometry():
    for length in (16, 17, 31, 64, 100, 1024):
        for overlap in (0, 4, 8):
            tiles = inference.axis_tiles(length, 16, 16 - overlap)
            starts = [s for s, _ in tiles]
            assert starts[0] == 0 and starts[-1] == length - 16
            assert all(0 < b - a <= 16 - overlap for a, b in zip(starts, starts[1:]))
            total = np.zeros(length)
            for s, w in tiles:
                assert w.min() > 0
                total[s:s + 16] += w
            assert total.min() > 1 - 1e-12
            # never three tiles on a pixel: neighbours' ramps sum to exactly one
            if all(2 * (b - a) >= 16 for a, b in zip(starts, starts[1:])):
                np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert inference.positions(1024, 64, 48) == list(range(0, 961, 48))  # (1024 - 64) / 48 = 20 steps exactly
    assert inference.positions(70, 16, 12) == [0, 11, 22, 32, 43, 54]  # 54 / 12 -> 5 steps of 10.8, rounded
    assert inference.positions(16, 16, 12) == inference.positions(9, 16, 12) == [0]  # one tile
    assert inference.tile_count(768, 1024, (64, 64), 16) == 16 * 21


def test_resize_mode_keeps_detail(fake_model):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (40, 50, 3)).astype(np.float32)
    out = inference.decompose_images(FakeSystem(), [img], ["xray"], steps=1, key=jax.random.key(0), mode="resize")[0]
    assert out.background.shape == img.shape
    # detail transfer: the input's high frequencies survive in the background
    assert np.corrcoef((out.background - img).ravel(), img.ravel())[0, 1] < 0.9
    with pytest.raises(ValueError, match="mode"):
        inference.decompose_images(FakeSystem(), [img], ["xray"], steps=1, key=jax.random.key(0), mode="bogus")


def test_choose_task_picks_the_plausible_change(monkeypatch):
    """A fake whose layers explain the composite only under the 'flare' law, and change nothing otherwise."""
    flare = blend.TASK_INDEX["flare"]

    def fake(system, comp, task, key, steps, guidance=None, extra=None):
        c = (np.asarray(comp) + 1) / 2
        light = np.clip(c - 0.3, 0, 1)  # the bright part is the flare
        bg = blend.from_linear(blend.to_linear(c) - blend.to_linear(light))
        is_flare = (np.asarray(task) == flare)[:, None, None, None]
        y = np.where(is_flare, bg, c)
        x = np.where(is_flare, light, 0.5)
        return {"y": jnp.asarray(y * 2 - 1), "x": jnp.asarray(x * 2 - 1)}

    monkeypatch.setattr(inference.system_lib, "decompose", fake)
    rng = np.random.default_rng(2)
    img = rng.uniform(0.4, 0.9, (48, 40, 3)).astype(np.float32)
    task, scores = inference.choose_task(FakeSystem(), img, steps=1, key=jax.random.key(0))
    assert task == "flare" and set(scores) == set(blend.TASKS)


def test_foreground_rgba_recomposes_every_law():
    """The saved RGBA layer over the predicted background gives back the composite (consistent layers)."""
    rng = np.random.default_rng(3)
    bg = rng.uniform(0, 1, (12, 12, 3))
    for task in blend.TASKS:
        rgba = np.concatenate([rng.uniform(0, 1, (12, 12, 3)), rng.uniform(0.2, 0.8, (12, 12, 1))], -1)
        comp = blend.composite(task, rgba, bg)
        render = blend.foreground_alone(task, rgba)
        layer = blend.foreground_rgba(task, render, comp, bg)
        assert layer.shape == (12, 12, 4)
        np.testing.assert_allclose(blend.foreground_alone(task, layer), render, atol=1e-6)
        if task != "glassware":  # glass: alpha is read as alpha-over, an approximation of its law
            assert blend.recompose_error(task, render, comp, bg) < 1e-6
