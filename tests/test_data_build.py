"""TFDS builders and the build CLI: all six subtasks, LOGO, odd inputs, kills."""

import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.dataset_info import DatasetInfoFileError
from test_data_synth import make_bad_folder

from dd_jax.data import blend, build, logo, pipeline

H, W = 32, 48
CAPTION = re.compile(r"^Three sub-images\. <image-1>: .+, <image-2>: .+, "
                     r"<image-3>: The overlapped of <image-1> and <image-2>\.$")


def run_build(*argv, rc: int = 0) -> str:
    """Runs the CLI; `rc`: the exit status expected (1: built, some user files skipped)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert build.main([str(a) for a in argv]) == rc
    return out.getvalue()


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    out = tmp_path_factory.mktemp("six")
    for task in blend.TASKS:
        run_build("--task", task, "--out", out, "--train", 3, "--test", 2,
                  "--height", H, "--width", W, "--seed", 1)
    return out


def check_records(src, task_name, h=H, w=W):
    for i in range(len(src)):
        ex = src[i]
        assert ex["composite"].shape == (h, w, 3) and ex["composite"].dtype == np.uint8
        assert ex["background"].shape == (h, w, 3)
        assert ex["foreground"].shape == (h, w, 4)
        cap = ex["caption"].decode()
        assert CAPTION.match(cap), cap
        assert blend.TASKS[ex["task"]] == task_name
        # data integrity: the stored layers recompose to the stored composite
        re_c = blend.composite(task_name, ex["foreground"] / 255.0, ex["background"] / 255.0) * 255.0
        assert np.abs(re_c - ex["composite"]).max() <= 2.0, (task_name, i)


@pytest.mark.parametrize("task", blend.TASKS)
def test_build_and_read_back(six, task):
    path = os.path.join(six, "alphablend", task, "1.0.0")
    b = tfds.builder_from_directory(path)
    assert b.info.splits["train"].num_examples == 3 and b.info.splits["test"].num_examples == 2
    assert b.info.metadata["height"] == H and b.info.metadata["width"] == W
    assert b.info.metadata["summary"]["examples"] == {"train": 3, "test": 2}
    assert b.info.file_format.value == "array_record"
    for split in ("train", "test"):
        check_records(b.as_data_source(split), task)
    srcs = tfds.data_source(f"alphablend/{task}", data_dir=str(six))
    assert len(srcs["train"]) == 3
    assert pipeline.find_dataset_dir(str(six), task)[0] == path
    # no TensorFlow anywhere
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None


def test_workers_give_the_same_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_build("--task", "glassware", "--out", a, "--train", 4, "--test", 0, "--size", 32)
    run_build("--task", "glassware", "--out", b, "--train", 4, "--test", 0, "--size", 32, "--workers", 2)
    sa = tfds.data_source("alphablend/glassware", data_dir=str(a), split="train")
    sb = tfds.data_source("alphablend/glassware", data_dir=str(b), split="train")
    for i in range(4):
        for k in ("composite", "background", "foreground", "caption"):
            np.testing.assert_array_equal(sa[i][k], sb[i][k])


def test_bad_user_folders_are_counted_not_fatal(tmp_path):
    bg = make_bad_folder(tmp_path / "bg")
    fg = tmp_path / "fg"
    fg.mkdir()
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[8:30, 5:35] = (250, 250, 250, 255)
    Image.fromarray(rgba).save(fg / "mark.png")
    Image.fromarray(rgba[..., :3]).save(fg / "no_alpha.jpg")
    (fg / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(rgba[:4, :4]).save(fg / "tiny.png")
    text = run_build("--task", "watermark", "--out", tmp_path / "out", "--train", 12, "--test", 0,
                     "--size", 32, "--backgrounds", bg, "--foregrounds", fg, rc=1)
    assert "skipped" in text and "corrupt" in text
    b = tfds.builder_from_directory(str(tmp_path / "out" / "alphablend" / "watermark" / "1.0.0"))
    s = b.info.metadata["summary"]
    assert s["examples"] == {"train": 12} and s["failed_samples"] == 0
    assert s["backgrounds"]["skipped"]["corrupt"] >= 1 and s["backgrounds"]["skipped"]["tiny"] == 1
    assert s["backgrounds"]["converted"].get("rgba") in (None, 1)
    assert s["foregrounds"]["skipped"]["corrupt"] == 1 and s["foregrounds"]["skipped"]["tiny"] == 1
    check_records(b.as_data_source("train"), "watermark", 32, 32)


def test_killed_build_leaves_no_dataset(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dd_jax.data.build", "--task", "occlusion", "--out", str(out),
         "--train", "100000", "--test", "0", "--size", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    task_dir = out / "alphablend" / "occlusion"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(task_dir.glob("incomplete*")):
            assert proc.poll() is None, "build ended early"
            time.sleep(0.2)
        time.sleep(1.5)  # well into writing examples
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(task_dir.glob("incomplete*"))  # it was killed half way ...
    assert not (task_dir / "1.0.0").exists()  # ... and nothing reads as complete
    with pytest.raises(FileNotFoundError):
        pipeline.find_dataset_dir(str(out), "occlusion")
    with pytest.raises(DatasetInfoFileError):
        tfds.builder_from_directory(str(task_dir / "1.0.0"))
    # a new build in the same place works
    run_build("--task", "occlusion", "--out", out, "--train", 2, "--test", 0, "--size", 32)
    assert pipeline.find_dataset_dir(str(out), "occlusion")[0].endswith("1.0.0")


def make_logo_tree(root, n_train=3, n_val=2, opacity=0.6, size=64):
    """A tiny LOGO-H tree in the benchmark's layout, composites made with ``opacity``."""
    rng = np.random.default_rng(0)
    top = root / "10khigh"
    (top / "natural").mkdir(parents=True)
    truth = {}
    for split, n in (("train_images", n_train), ("val_images", n_val)):
        for sub in ("image", "mask", "wm"):
            (top / split / sub).mkdir(parents=True)
        for i in range(n):
            coco = f"{100 + i + (50 if split == 'val_images' else 0):012d}"
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
                top / "natural" / f"{coco}.jpg", quality=90)
            nat = np.asarray(Image.open(top / "natural" / f"{coco}.jpg"), np.float32) / 255
            mask = np.zeros((size, size), np.float32)
            mask[10:40, 12:50] = 1.0
            wm = np.zeros((size, size, 3), np.float32)
            wm[mask > 0] = rng.random(3)
            comp = (1 - opacity * mask[..., None]) * nat + opacity * mask[..., None] * wm
            stem = f"{coco}-logo{i}-{i % 3}"
            Image.fromarray(np.rint(comp * 255).astype(np.uint8)).save(top / split / "image" / f"{stem}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(top / split / "mask" / f"{stem}.png")
            Image.fromarray(np.rint(wm * 255).astype(np.uint8)).save(top / split / "wm" / f"{stem}.png")
            truth[stem] = opacity
    # an entry whose clean image is missing: skipped and counted
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(top / "train_images" / "image" / "999-x-1.png")
    return root, truth


def test_logo_builder(tmp_path):
    root, _ = make_logo_tree(tmp_path / "LOGO")
    text = run_build("--task", "logo", "--logo-config", "high", "--manual-dir", root, "--out", tmp_path / "out",
                     rc=1)  # one entry skipped
    assert "missing_or_unreadable" in text
    path, name = pipeline.find_dataset_dir(str(tmp_path / "out"), "logo")
    assert name == "logo/high"
    b = tfds.builder_from_directory(path)
    assert b.info.splits["train"].num_examples == 3 and b.info.splits["test"].num_examples == 2
    src = b.as_data_source("train")
    check_records(src, "watermark", 64, 64)
    for i in range(len(src)):
        alpha = src[i]["foreground"][..., 3]
        assert abs(alpha.max() / 255.0 - 0.6) < 0.02  # the estimated opacity


def test_opacity_estimate_is_exact_on_clean_data():
    rng = np.random.default_rng(1)
    nat, wm = rng.random((20, 20, 3)), rng.random((20, 20, 3))
    mask = (rng.random((20, 20)) > 0.5).astype(np.float64)
    comp = (1 - 0.37 * mask[..., None]) * nat + 0.37 * mask[..., None] * wm
    assert abs(logo.estimate_opacity(comp, nat, wm, mask) - 0.37) < 1e-9


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        build.parse_args(["--task", "xray", "--out", "x", "--size", "64", "--height", "32"])
    with pytest.raises(SystemExit):
        build.parse_args(["--task", "logo", "--out", "x"])
    a = build.parse_args(["--task", "xray", "--out", "x", "--height", "512", "--width", "1024"])
    assert (a.height, a.width) == (512, 1024)
