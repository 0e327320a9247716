"""decompose --passes N: each pass decomposes the background the pass before wrote; the task per pass (given as a
comma list, one for all, or chosen automatically); every foreground written in order, the last background, the
sidecar's per-pass records and the PSD's layer order. A pointwise fake model stands in for the network."""

import glob
import json
import os

import fake_model
import numpy as np
import pytest
from PIL import Image

from dd_jax import decompose
from dd_jax.data import blend

TILE = 16


@pytest.fixture
def fake(monkeypatch):
    """The model inputs seen, per call: (composite [B, H, W, 3] in [0, 1], task indices)."""
    return fake_model.patch_decompose(monkeypatch, TILE)


def sidecar(folder) -> dict:
    (path,) = glob.glob(os.path.join(folder, decompose.SIDECAR_PREFIX + "*.json"))
    with open(path) as f:
        return json.load(f)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def outputs(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(decompose.SIDECAR_PREFIX))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (TILE, TILE, 3), np.uint8)).save(path)
    return path


def test_pass_tasks_parsing():
    assert decompose.pass_tasks(None, 3) == [None] * 3
    assert decompose.pass_tasks("flare", 2) == ["flare", "flare"]
    assert decompose.pass_tasks("watermark,flare", 2) == ["watermark", "flare"]
    assert decompose.pass_tasks(" watermark , auto ", 2) == ["watermark", None]
    assert decompose.pass_tasks(["occlusion", None], 2) == ["occlusion", None]
    assert decompose.pass_tasks("cell", 1) == ["cell"]
    for bad, n in (("watermark,flare", 3), ("watermark,flare", 1), ("a,b,c", 3), ("watermark,,flare", 3)):
        with pytest.raises(ValueError):
            decompose.pass_tasks(bad, n)


@pytest.mark.parametrize("task,passes", [("watermark,flare,cell", 2),
                                         ("watermark,flare", 1),  # two tasks, one pass
                                         ("watermark,flare", 3),
                                         ("watermark,nosuch", 2),
                                         (None, 0)])
def test_bad_task_lists_are_usage_errors(task, passes, image, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decompose.checkpoints, "load_trained", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["--input", str(image), "--output", str(tmp_path / "o"), "--passes", str(passes)]
    with pytest.raises(SystemExit) as e:
        decompose.main(args + (["--task", task] if task else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and not os.path.exists(tmp_path / "o")
    assert "error: " + ("--passes 0" if passes == 0 else "") in err and (task is None or "--task" in err), err
    with pytest.raises(ValueError):  # and the same from run()
        decompose.run([str(image)], str(tmp_path / "o"), task=task, passes=passes)
    assert not os.path.exists(tmp_path / "o")


def test_two_passes_write_both_foregrounds_in_order_and_feed_the_background_on(fake, image, tmp_path):
    """--passes 2 --task watermark,flare == --passes 1 --task watermark, then --passes 1 --task flare on the
    background that wrote (by value); the model's second input is that 8-bit background."""
    out = tmp_path / "two"
    assert decompose.main(["--input", str(image), "--output", str(out), "--passes", "2",
                           "--task", "watermark,flare"]) == 0
    assert outputs(out) == ["photo_background.png", "photo_foreground_1.png", "photo_foreground_2.png"]
    assert [int(c[1][0]) for c in fake] == [blend.TASK_INDEX["watermark"], blend.TASK_INDEX["flare"]]
    # the same by hand, one pass at a time through the written files
    one = tmp_path / "one"
    assert decompose.main(["--input", str(image), "--output", str(one), "--task", "watermark"]) == 0
    assert outputs(one) == ["photo_background.png", "photo_foreground.png"]  # one pass: today's names
    bg1 = png(one / "photo_background.png")
    # pass 2's input: pass 1's 8-bit background (exact up to the model's float32 [-1, 1] scaling)
    np.testing.assert_allclose(fake[1][0][0], bg1 / 255.0, rtol=0, atol=1e-6)
    assert not np.array_equal(fake[0][0][0], fake[1][0][0])
    again = tmp_path / "again"
    (tmp_path / "mid").mkdir()
    Image.fromarray(bg1).save(tmp_path / "mid" / "photo.png")
    assert decompose.main(["--input", str(tmp_path / "mid" / "photo.png"), "--output", str(again),
                           "--task", "flare"]) == 0
    np.testing.assert_array_equal(png(out / "photo_foreground_1.png"), png(one / "photo_foreground.png"))
    np.testing.assert_array_equal(png(out / "photo_foreground_2.png"), png(again / "photo_foreground.png"))
    np.testing.assert_array_equal(png(out / "photo_background.png"), png(again / "photo_background.png"))
    assert not np.array_equal(png(out / "photo_background.png"), bg1)

    (r,) = sidecar(out)["images"]
    assert r["task"] == "watermark,flare" and r["task_from"] == ["--task", "--task"]
    assert r["outputs"] == {"background": "photo_background.png", "foreground_1": "photo_foreground_1.png",
                            "foreground_2": "photo_foreground_2.png"}
    assert [(p["pass"], p["task"], p["foreground"]) for p in r["passes"]] == [
        (1, "watermark", "photo_foreground_1.png"), (2, "flare", "photo_foreground_2.png")]
    comp = png(image) / 255.0
    fg1, fg2, bg = (png(out / f) for f in ("photo_foreground_1.png", "photo_foreground_2.png",
                                           "photo_background.png"))
    assert r["passes"][0]["recompose_rmse"] == pytest.approx(
        blend.layers_error("watermark", fg1, bg1, comp) * 255, abs=1e-3)
    assert r["passes"][1]["recompose_rmse"] == pytest.approx(
        blend.layers_error("flare", fg2, bg, bg1 / 255.0) * 255, abs=1e-3)
    whole = blend.composite("watermark", fg1 / 255.0, blend.composite("flare", fg2 / 255.0, bg / 255.0))
    assert r["recompose_rmse"] == pytest.approx(blend.rmse(whole, comp) * 255, abs=1e-3)
    (r1,) = sidecar(one)["images"]  # one pass: the record as before, and one pass listed
    assert r1["task"] == "watermark" and r1["task_from"] == "--task" and len(r1["passes"]) == 1
    assert r1["recompose_rmse"] == r1["passes"][0]["recompose_rmse"]


def test_one_task_serves_every_pass_and_auto_chooses_per_pass(fake, image, tmp_path, monkeypatch, capsys):
    seen = []

    def choose(system, img, **kw):
        seen.append(np.asarray(img))
        return "occlusion", {t: float(t == "occlusion") for t in blend.TASKS}

    monkeypatch.setattr(decompose.inference, "choose_task", choose)
    out = tmp_path / "o"
    assert decompose.main(["--input", str(image), "--output", str(out), "--passes", "3", "--task", "cell"]) == 0
    assert not seen and [int(c[1][0]) for c in fake] == [blend.TASK_INDEX["cell"]] * 3
    assert outputs(out) == ["photo_background.png"] + [f"photo_foreground_{p}.png" for p in (1, 2, 3)]
    fake.clear()
    capsys.readouterr()
    out = tmp_path / "auto"
    assert decompose.main(["--input", str(image), "--output", str(out), "--passes", "2", "--task", "xray,auto"]) == 0
    assert [int(c[1][0]) for c in fake] == [blend.TASK_INDEX["xray"], blend.TASK_INDEX["occlusion"]]
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], fake[1][0][0], rtol=0, atol=1e-6)  # chosen on pass 2's own input
    assert "photo.png, pass 2 (16x16): task occlusion (chosen automatically" in capsys.readouterr().err
    (r,) = sidecar(out)["images"]
    assert r["task"] == "xray,occlusion" and r["task_from"][0] == "--task"
    assert r["task_from"][1].startswith("chosen automatically")


def test_passes_never_write_over(fake, image, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "photo_foreground_2.png").write_bytes(b"mine")
    assert decompose.main(["--input", str(image), "--output", str(out), "--passes", "2", "--task", "cell"]) == 2
    assert "photo_foreground_2.png exists" in capsys.readouterr().err and not fake
    assert sorted(os.listdir(out)) == ["photo_foreground_2.png"]
    assert not [f for f in os.listdir(out) if "partial" in f]


def test_psd_of_two_passes(fake, image, tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    from dd_jax import psd_layers

    out = tmp_path / "o"
    assert decompose.main(["--input", str(image), "--output", str(out), "--passes", "2", "--task", "watermark,flare",
                           "--format", "both"]) == 0
    doc = psd_tools.PSDImage.open(out / "photo.psd")
    # bottom to top: the last background, pass 2's foreground, pass 1's (the outermost overlay)
    assert [layer.name for layer in doc] == ["background", "foreground 2 (flare)", "foreground 1 (watermark)"]
    assert [layer.blend_mode.name for layer in doc] == ["NORMAL", "LINEAR_DODGE", "NORMAL"]
    (r,) = sidecar(out)["images"]
    fg1, fg2, bg = (png(out / f) for f in ("photo_foreground_1.png", "photo_foreground_2.png",
                                           "photo_background.png"))
    # psd-tools' compositing = the blend laws applied to the written PNG layers, outermost (pass 1) last
    law = blend.composite("watermark", fg1 / 255.0, blend.composite("flare", fg2 / 255.0, bg / 255.0))
    assert np.abs(psd_layers.read_composite(str(out / "photo.psd")) - law).max() <= 2.01 / 255
    assert abs(r["psd_rmse"] - r["recompose_rmse"]) < 1.0
