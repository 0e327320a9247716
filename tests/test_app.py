"""The local web app, dd_jax.app: its work (stop between batches, a folder per request), the API through
gradio_client, and the page in headless Chromium.

The app runs once for the module, in a subprocess on a free port with the shipped model (`app_browser.App`); the
tests that need it skip, with the reason, where gradio (`pip install -e ".[app]"`) or Chromium is absent."""

import importlib.util
import os
import shutil

import app_browser
import fake_model
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dd_jax import app, decompose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "docs", "samples")
MAX_PIXELS = 200 * 200  # the app's --max-pixels: the samples (192x192) pass, a 256x256 image does not

needs_gradio = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gradio", "gradio_client")),
    reason=f"needs gradio and gradio_client (the app extra): {app.INSTALL}")
pytestmark = pytest.mark.xdist_group("app")  # one app for the module (.ci/run: --dist loadgroup)


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float64)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ------------------------------------------------------------------ the work, without gradio (the fake model)
@pytest.fixture
def fake_decomposer(monkeypatch, tmp_path):
    calls = fake_model.patch(monkeypatch)
    model = decompose.Model(fake_model.FakeSystem(tile=16), None, "fake")
    return app.Decomposer(model, str(tmp_path / "app")), calls


def test_stop_ends_the_request_after_the_batch_in_flight(fake_decomposer, tmp_path):
    dec, calls = fake_decomposer
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):  # 100x100 in tiles of 16 (overlap 4): 64 tiles, 4 batches of 16
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), np.uint8)).save(src / name)
    seen = []

    def progress(label, done, total):
        seen.append((label, done, total))
        dec.stop("s")  # Stop pressed while the first batch was in the model

    res = dec.run([str(src / "a.png"), str(src / "b.png")], "s", task="cell", mode="tile", progress=progress)
    assert res.stopped and not res.outputs
    assert len(calls) == 2 and seen == [("a.png", 16, 64)]  # the second batch's progress stopped it
    assert res.messages == ["stopped: 0 decomposition(s) finished before Stop are shown"]
    assert sorted(os.listdir(src)) == ["a.png", "b.png"]  # nothing beside the inputs
    # the next request of the session runs in full, in a new folder; the last one's is removed
    first = dec.folders["s"]
    res = dec.run([str(src / "b.png")], "s", task="cell", mode="tile", psd=False)
    assert not res.stopped and [o.label for o in res.outputs] == ["b.png"] and not os.path.exists(first)
    assert sorted(os.path.basename(f)[:10] for f in res.files) == ["b_backgrou", "b_foregrou", "decompose_"]
    assert Image.open(res.outputs[0].foregrounds[0][0]).size == (100, 100)  # the preview, on a checkerboard
    dec.forget("s")
    assert "s" not in dec.folders and not os.listdir(dec.results_dir)


def test_compilations_are_counted():
    before = app.Compilations.count()
    f = jax.jit(lambda x: x * 3 + 1)
    f(jnp.ones(5))
    after = app.Compilations.count()
    f(jnp.ones(5) * 2)  # the same shape: no new program
    assert after > before and app.Compilations.count() == after


def test_checkerboard_shows_the_layer_over_it():
    rgba = np.zeros((4, 64, 4), np.uint8)
    rgba[:, 32:] = (200, 10, 10, 255)  # opaque right half, transparent left half
    out = app.on_checkerboard(rgba, square=16)
    assert (out[0, :16] == 255).all() and (out[0, 16:32] == 204).all() and (out[:, 32:] == (200, 10, 10)).all()
    assert (app.on_checkerboard(rgba, square=16, dark=True)[0, :32] < 64).all()


# ------------------------------------------------------------------ the app itself, in a subprocess
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with the shipped model; after the tests, stopped with SIGTERM: its folder must be gone."""
    cwd = tmp_path_factory.mktemp("app_cwd")
    server = app_browser.App(str(cwd), str(tmp_path_factory.mktemp("app_log") / "app.log"),
                             ("--max-pixels", str(MAX_PIXELS)))
    yield server
    assert server.stop() == 0, server.text()
    assert not os.path.exists(server.workdir), "the app left its uploads and results behind"
    assert not os.listdir(cwd), f"the app wrote {os.listdir(cwd)} in its working folder"


@needs_gradio
def test_api_decomposes_a_sample(served, tmp_path):
    from gradio_client import Client, handle_file

    src = tmp_path / "mine"
    src.mkdir()
    for name in ("watermark_1.png", "xray_1.png"):
        shutil.copy(os.path.join(SAMPLES, name), src / name)
    shutil.copy(src / "xray_1.png", src / "scan.png")  # no task in its name
    client = Client(served.url, verbose=False, download_files=str(tmp_path / "downloads"))

    bg, fg = client.predict(handle_file(str(src / "watermark_1.png")), "auto", api_name="/decompose")
    assert Image.open(bg).mode == "RGB" and Image.open(bg).size == (192, 192)
    assert Image.open(fg).mode == "RGBA" and Image.open(fg).size == (192, 192)
    bg, fg = client.predict(handle_file(str(src / "xray_1.png")), "auto", api_name="/decompose")
    truth = rgb(os.path.join(SAMPLES, "truth", "xray_1_background.png"))
    assert rmse(rgb(bg), truth) < 0.5 * rmse(rgb(src / "xray_1.png"), truth)  # the item taken out (15 vs 49)
    bg2, _ = client.predict(handle_file(str(src / "scan.png")), "xray", api_name="/decompose")
    assert np.array_equal(rgb(bg2), rgb(bg))  # the task given: the same as from the file name
    log = served.text()
    assert "xray_1.png (192x192): task xray (file name)" in log and "scan.png (192x192): task xray (--task)" in log
    requests = served.requests()[-3:]
    assert len(requests) == 3 and all(r.endswith(" 0 new compilation(s)") for r in requests), requests
    assert sorted(os.listdir(src)) == ["scan.png", "watermark_1.png", "xray_1.png"]  # nothing written beside them


@needs_gradio
def test_api_refuses_as_the_cli_does(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bad, big = tmp_path / "broken.png", tmp_path / "big.png"
    bad.write_bytes(b"not an image")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(big)
    client = Client(served.url, verbose=False, download_files=str(tmp_path / "downloads"))
    for path, check in ((bad, lambda p: decompose.read_rgb(p)),
                        (big, lambda p: decompose.check_size(p, "resize", MAX_PIXELS))):
        with pytest.raises(ValueError) as cli_error:  # what the CLI says of it: `skipping PATH: MESSAGE`
            check(str(path))
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(path)), "watermark", api_name="/decompose")
        # the same line, the file named as the user named it (not where the app keeps the upload)
        assert str(e.value) == f"skipping {path.name}: {str(cli_error.value).replace(str(path), path.name)}"


@needs_gradio
@pytest.mark.skipif(app_browser.missing() is not None, reason=f"browser test: {app_browser.missing()}")
def test_page_shows_the_layers(served):
    from selenium.webdriver.common.by import By

    files = [os.path.join(SAMPLES, n) for n in ("xray_1.png", "flare_1.png")]
    with app_browser.chromium() as driver:
        panels = app_browser.decompose(driver, served.url, files)
        table = driver.find_element(By.CSS_SELECTOR, "#errors").text
        downloads = driver.find_element(By.CSS_SELECTOR, "#downloads").text.replace("\n", "")
    for panel, (src, w, h) in panels.items():
        assert src.startswith(served.url) and (w, h) == (192, 192), panel  # from the app, at the input's size
    assert "xray_1.png" in table and "flare_1.png" in table and "file name" in table
    for name in ("xray_1_background.png", "xray_1_foreground.png", "xray_1.psd", "flare_1.psd", "decompose_"):
        assert name.split(".")[0] in downloads, name
    assert served.requests()[-1].endswith(" 0 new compilation(s)")
