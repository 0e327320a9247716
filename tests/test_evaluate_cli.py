"""dd_jax.evaluate: tables, identity baseline, n/a columns without weights, LOGO protocol, CLI."""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import tiny
from dd_jax import checkpoints, evaluate, metrics, system as system_lib
from dd_jax.data import blend, build
from dd_jax.metrics import report as report_lib
from dd_jax.metrics.weights import save_module

SIZE = 32  # working size of the test model; the LOGO tree is stored at 64 (detail-transfer path)
TASKS = ("xray", "watermark")


def tiny_config(data_dir: str):
    c = tiny.get_config()
    p = c.model.params
    p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks = 32, 2, 1, 1
    p.vec_in_dim = p.context_in_dim = 16
    p.axes_dim = [4, 6, 6]
    c.text.length = 3
    c.data.dir = str(data_dir)
    c.data.height = c.data.width = SIZE
    c.sample.steps = 1
    return c


def quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    for task in TASKS:
        quiet(build.main, ["--task", task, "--out", str(data), "--train", "0", "--test", "3",
                           "--size", str(SIZE), "--seed", "1234"])
    model = str(root / "model")
    checkpoints.export(system_lib.build(tiny_config(data)), model)  # untrained: the numbers only need to be consistent
    return root, str(data), model


def stored(data, task):
    src = tfds.builder_from_directory(os.path.join(data, "alphablend", task, "1.0.0")).as_data_source("test")
    f = lambda k: np.stack([src[i][k] for i in range(len(src))]).astype(np.float32) / 255.0  # noqa: E731
    return f("composite"), f("background"), f("foreground")


class FakeNets(evaluate.Networks):
    """LPIPS from a random-init network file; FID 'features' are per-channel moments (no InceptionV3 on CPU)."""

    def __init__(self, lpips_file=None):
        super().__init__(lpips_file, None)
        self.inception, self.fid_path = True, "fake"

    def fid_features(self, images):
        x = np.asarray(images, np.float64)
        return np.concatenate([x.mean((1, 2)), x.std((1, 2)), (x ** 2).mean((1, 2))], -1)


def test_report_without_weights(setup):
    root, data, model = setup
    out = str(root / "plain")
    rep = quiet(evaluate.run, data, out, model, tasks=list(TASKS), batch_size=2, steps=1)  # 3 images: padded batch
    assert sorted(os.listdir(out)) == ["cases.png", "metrics.json", "report.md"]
    assert json.load(open(os.path.join(out, "metrics.json")))["tasks"].keys() == set(TASKS)
    for task in TASKS:
        r = rep["tasks"][task]
        assert r["n"] == 3 and len(r["per_image"]["background/model/rmse"]) == 3 and r["eval_size"] == [SIZE, SIZE]
        comp, bg, fg = stored(data, task)
        alone = blend.foreground_alone(task, fg)
        # the identity row is the metrics of the composite itself
        ident = r["background"]["identity"]
        np.testing.assert_allclose(ident["rmse"], np.mean(metrics.rmse(comp, bg)), rtol=1e-4)
        np.testing.assert_allclose(ident["ssim"], np.mean(metrics.ssim(comp, bg)), rtol=1e-4)
        np.testing.assert_allclose(ident["psnr"], np.mean(metrics.psnr(comp, bg)), rtol=1e-4)
        np.testing.assert_allclose(r["foreground"]["identity"]["rmse"], np.mean(metrics.rmse(comp, alone)), rtol=1e-4)
        np.testing.assert_allclose(r["foreground"]["identity"]["ssim"], np.mean(metrics.ssim(comp, alone)), rtol=1e-4)
        for layer in ("background", "foreground"):
            for method in ("identity", "model"):
                assert r[layer][method]["lpips"] == evaluate.NA and r[layer][method]["fid"] == evaluate.NA
        assert r["background"]["rmse_ratio"] == pytest.approx(r["background"]["model"]["rmse"] / ident["rmse"])
        assert set(r["cases"]) == {"best", "worst"}
        assert r["build"]["seed"] == 1234 and r["build"]["height"] == SIZE
    s = rep["summary"]
    assert s["mean_background_rmse_ratio"] == pytest.approx(np.mean([rep["tasks"][t]["background"]["rmse_ratio"]
                                                                     for t in TASKS]))
    md = open(os.path.join(out, "report.md")).read()
    assert "## Table 1: background" in md and "## Table 3: foreground" in md and "LOGO" not in md
    assert md.count("| Identity (composite) |") == 2 and md.count("| Model |") == 2
    assert "| Identity (composite) | 0" not in md  # RMSE first, not a blank
    row = next(line for line in md.splitlines() if line.startswith("| Model |"))
    assert row.count(evaluate.NA) == 4  # LPIPS and FID of two subtasks
    assert "Mean of the per-subtask background RMSE ratios" in md
    assert "- data build seeds: 1234 (all subtasks)" in md
    with Image.open(os.path.join(out, "cases.png")) as im:
        assert im.size[1] > 4 * SIZE  # worst + best of two subtasks


def test_weights_and_samples(setup, tmp_path):
    root, data, model = setup
    from flax import nnx

    from dd_jax.metrics import lpips

    lp_file = str(tmp_path / "lpips.safetensors")
    save_module(lpips.LPIPS(rngs=nnx.Rngs(3)), lp_file, lpips.FORMAT)
    nets = FakeNets(lp_file)
    out = str(tmp_path / "rep")
    rep = quiet(evaluate.run, data, out, model, tasks=["xray"], batch_size=2, steps=1, limit=2, num_samples=2,
                nets=nets)
    r = rep["tasks"]["xray"]
    comp, bg, _ = stored(data, "xray")
    comp, bg = comp[:2], bg[:2]
    assert r["n"] == 2
    np.testing.assert_allclose(r["background"]["identity"]["lpips"],
                               np.mean(lpips.distance(nets.lpips, comp, bg)), rtol=1e-4)
    np.testing.assert_allclose(r["background"]["identity"]["fid"],
                               evaluate.fid_score(nets.fid_features(bg), nets.fid_features(comp)), rtol=1e-4)
    assert isinstance(r["background"]["model"]["fid"], float) and isinstance(r["foreground"]["model"]["lpips"], float)
    md = open(os.path.join(out, "report.md")).read()
    assert evaluate.NA not in md.split("## Summary")[1]
    # two samples: a per-image value is the mean of the two samples' values
    assert len(r["per_image"]["background/model/rmse"]) == 2


def test_model_rows_are_a_direct_decomposition(setup):
    """At the working size both modes are one tile per image: the numbers of sampling the stored composites."""
    root, data, model = setup
    system = checkpoints.load_trained(model)
    comp, bg, _ = stored(data, "xray")
    want = []
    for b, start in enumerate(range(0, len(comp), 2)):  # batches of 2, the last padded with its last image
        c = comp[start:start + 2]
        n = len(c)
        c = np.concatenate([c, np.repeat(c[-1:], 2 - n, 0)])
        key = jax.random.fold_in(jax.random.key(0), b)
        y = system_lib.decompose(system, jnp.asarray(c * 2 - 1), jnp.full((2,), blend.TASK_INDEX["xray"]), key, 1)
        want += list(np.asarray(metrics.rmse(np.clip((np.asarray(y["y"]) + 1) / 2, 0, 1)[:n], bg[start:start + n])))
    for mode in ("tile", "resize"):
        rep = quiet(evaluate.run, data, str(root / f"direct_{mode}"), model, tasks=["xray"], batch_size=2, steps=1,
                    mode=mode)
        assert rep["mode"] == mode
        np.testing.assert_allclose(rep["tasks"]["xray"]["per_image"]["background/model/rmse"], want, rtol=1e-4)


def make_logo(root):
    """A LOGO-H tree (64x64, two test images) built into a dataset; returns (data dir, truth per test image)."""
    import test_data_build

    tree, _ = test_data_build.make_logo_tree(root / "LOGO", n_train=1, n_val=2, opacity=0.5, size=64)
    out = root / "logo_data"
    quiet(build.main, ["--task", "logo", "--logo-config", "high", "--manual-dir", str(tree), "--out", str(out)])
    val = tree / "10khigh" / "val_images"
    truth = []
    for f in sorted(os.listdir(val / "image")):
        rd = lambda p: np.asarray(Image.open(p).convert("RGB"), np.float32) / 255  # noqa: E731
        nat = rd(tree / "10khigh" / "natural" / (f.split("-")[0] + ".jpg"))
        mask = np.asarray(Image.open(val / "mask" / f), np.float32) / 255
        truth.append((rd(val / "image" / f), nat, mask))
    return str(out), truth


def test_logo_protocol_cli(setup, tmp_path):
    _, _, model = setup
    data, truth = make_logo(tmp_path)
    out = tmp_path / "logo_report"
    assert quiet(evaluate.main, ["--checkpoint", model, "--data", data, "--tasks", "logo", "--output", str(out),
                                 "--batch-size", "2", "--steps", "1"]) == 0
    rep = json.load(open(out / "metrics.json"))
    r = rep["tasks"]["LOGO-H"]
    assert r["dataset"] == "logo/high" and r["n"] == 2 and r["eval_size"] == [64, 64]  # the stored size
    comp, nat, mask = (np.stack(x) for x in zip(*truth))
    ident = r["background"]["identity"]
    np.testing.assert_allclose(ident["rmse"], np.mean(metrics.rmse(comp, nat)), rtol=1e-4)
    np.testing.assert_allclose(ident["rmse_w"], np.mean(metrics.rmse_masked(comp, nat, mask)), rtol=1e-4)
    np.testing.assert_allclose(ident["psnr"], np.mean(metrics.psnr(comp, nat)), rtol=1e-4)
    np.testing.assert_allclose(ident["ssim_zero_pad"], np.mean(metrics.ssim(comp, nat, zero_pad=True)), rtol=1e-4)
    assert ident["rmse_w"] > ident["rmse"]  # the error lives inside the mark
    md = (out / "report.md").read_text()
    assert "## LOGO protocol (background)" in md and "| LOGO-H | Model |" in md
    assert "- command: `python -m dd_jax.evaluate --checkpoint" in md
    small = quiet(evaluate.run, data, str(tmp_path / "small"), model, tasks=["logo/high"], batch_size=2, steps=1,
                  at_working_size=True)
    assert small["tasks"]["LOGO-H"]["eval_size"] == [SIZE, SIZE]


def test_json_keeps_per_image_lists_on_one_line():
    d = {"a": [1, 2.5, None], "b": {"c": [], "d": ["x, y", "z"], "e": [[1, 2], [3]]}, "f": "n/a (no weights)"}
    text = report_lib.to_json(d)
    assert json.loads(text) == d and '"a": [1, 2.5, null]' in text


def test_cli_errors(tmp_path):
    assert quiet(evaluate.main, ["--data", str(tmp_path / "none"), "--output", str(tmp_path / "o"),
                                 "--checkpoint", str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit):
        quiet(evaluate.main, ["--data", "x", "--output", "y", "--limit", "0"])
    for steps in ("0", "-3"):  # not silently the config's steps, nor a numpy error
        with pytest.raises(SystemExit):
            quiet(evaluate.main, ["--data", "x", "--output", "y", "--steps", steps])
    with pytest.raises(ValueError, match="at least one sampling step"):
        evaluate.run(str(tmp_path / "none"), str(tmp_path / "o"), steps=0)


def test_markdown_layout_blocks_of_three():
    row = {m: 1.0 for m in ("rmse", "ssim", "psnr", "rmse_w", "ssim_zero_pad")} | {"lpips": evaluate.NA,
                                                                                    "fid": evaluate.NA}
    tasks = {t: {"dataset": f"alphablend/{t}", "n": 1, "eval_size": [8, 8],
                 "background": {"identity": row, "model": row, "rmse_ratio": 1.0},
                 "foreground": {"identity": row, "model": None}} for t in blend.TASKS}
    lines = report_lib.paper_table({"tasks": tasks}, "background", report_lib.BACKGROUND_ORDER)
    headers = [ln for ln in lines if ln.startswith("| Models")]
    assert len(headers) == 2 and headers[0].startswith("| Models | watermark RMSE↓")  # the paper's order
    fg = report_lib.paper_table({"tasks": tasks}, "foreground", report_lib.FOREGROUND_ORDER)
    assert "| Model | - | - |" in "\n".join(fg)  # no foreground prediction: dashes


# ------------------------------------------------------------------ never lose a report (issue 25)
REPORT = ("metrics.json", "report.md", "cases.png")


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = evaluate.main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.mark.parametrize("name", ["report.md", "metrics.json"])
def test_an_existing_report_is_refused_up_front(setup, tmp_path, monkeypatch, name):
    """Without --overwrite a report file in --output is refused with one line naming it and the option, before
    the model is loaded; the folder is left as it was."""
    _, data, model = setup
    out = tmp_path / "rep"
    out.mkdir()
    (out / name).write_text("last week's numbers")
    (out / "notes.txt").write_text("kept")
    loads = []
    monkeypatch.setattr(checkpoints, "load_trained", lambda *a, **k: loads.append(a) or 1 / 0)
    rc, err = run_cli(["--data", data, "--output", out, "--checkpoint", model, "--tasks", "xray", "--steps", 1])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert str(out / name) in lines[0] and "--overwrite" in lines[0]
    assert not loads  # refused before any work
    assert sorted(os.listdir(out)) == sorted([name, "notes.txt"])
    assert (out / name).read_text() == "last week's numbers"


def test_overwrite_replaces_the_report_whole(setup, tmp_path, monkeypatch):
    """--overwrite replaces the report; a write that fails half-way leaves the report before it whole."""
    _, data, model = setup
    out = tmp_path / "rep"
    argv = ["--data", data, "--output", out, "--checkpoint", model, "--tasks", "xray", "--steps", 1, "--limit", 1,
            "--batch-size", 1]
    assert run_cli(argv)[0] == 0
    (out / "notes.txt").write_text("kept")
    before = {f: (out / f).read_bytes() for f in REPORT}

    class Crash(Exception):
        pass

    def crash(report):
        raise Crash  # the run dies while the report is being written

    monkeypatch.setattr(report_lib, "markdown", crash)
    with pytest.raises(Crash):
        quiet(evaluate.run, data, str(out), model, tasks=["xray"], steps=1, limit=1, batch_size=1, overwrite=True)
    assert {f: (out / f).read_bytes() for f in REPORT} == before  # nothing half-written
    assert sorted(os.listdir(out)) == sorted([*REPORT, "notes.txt"])  # no temporary file left
    monkeypatch.undo()
    rc, err = run_cli(argv + ["--overwrite", "--seed", 5])
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["seed"] == 5
    assert sorted(os.listdir(out)) == sorted([*REPORT, "notes.txt"])
