"""Public benchmarks beside LOGO: the CLWD and Flare7K++ builders (on tiny trees in the published layouts),
their evaluation protocols, and the protocols' metric definitions against hand computations."""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dd_jax import metrics
from dd_jax.data import blend, build, pipeline, public
from dd_jax.metrics import protocols

S = 32


def run_build(*argv, rc: int = 0) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert build.main([str(a) for a in argv]) == rc
    return out.getvalue(), err.getvalue()


def save(a, path):
    a = np.asarray(a)
    a = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8) if a.dtype != np.uint8 else a
    Image.fromarray(a).save(path, **({"quality": 95} if str(path).endswith(".jpg") else {}))


def make_clwd_tree(root, n_train=2, n_test=3):
    """CLWD's layout: {train,test}/{Watermarked_image,Watermark_free_image}/<n>.jpg, {Watermark,Alpha,Mask}/<n>.png."""
    rng = np.random.default_rng(0)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("Watermarked_image", "Watermark_free_image", "Watermark", "Alpha", "Mask"):
            (root / split / sub).mkdir(parents=True)
        for i in range(1, n + 1):
            bg = rng.random((S, S, 3))
            mask = np.zeros((S, S))
            mask[4 + i:20 + i, 6:26] = 1.0
            alpha = mask * (0.3 + 0.1 * i)
            wm = np.zeros((S, S, 3))
            wm[mask > 0] = rng.random(3)
            comp = (1 - alpha[..., None]) * bg + alpha[..., None] * wm
            d = root / split
            save(comp, d / "Watermarked_image" / f"{i}.jpg")
            save(bg, d / "Watermark_free_image" / f"{i}.jpg")
            save(wm, d / "Watermark" / f"{i}.png")
            save(alpha, d / "Alpha" / f"{i}.png")
            save(mask, d / "Mask" / f"{i}.png")
            truth[(split, str(i))] = d
    return root, truth


def make_flare_tree(root, n=3, config="real"):
    """Flare7K++'s layout: test_data/<config>/{input,gt,mask}/{input,gt,mask}_000000.png."""
    rng = np.random.default_rng(1)
    top = root / "test_data" / config
    for sub in ("input", "gt", "mask"):
        (top / sub).mkdir(parents=True)
    for i in range(n):
        gt = rng.random((S, S, 3)) * 0.5
        yy, xx = np.mgrid[:S, :S]
        light = np.exp(-((yy - 16) ** 2 + (xx - 10 - i) ** 2) / 40.0)[..., None] * np.array([1.0, 0.8, 0.5])
        comp = blend.flare_law(light, gt)
        mask = np.zeros((S, S, 3), np.uint8)
        mask[10:22, 4:20] = (255, 255, 0)  # glare
        mask[15:17, 20:30] = (255, 0, 0)  # streak
        mask[14:18, 8 + i:12 + i] = (0, 0, 255)  # light source
        save(comp, top / "input" / f"input_{i:06d}.png")
        save(gt, top / "gt" / f"gt_{i:06d}.png")
        save(mask, top / "mask" / f"mask_{i:06d}.png")
    return root


# ---------------------------------------------------------------- builders
def test_clwd_builder(tmp_path):
    src, truth = make_clwd_tree(tmp_path / "CLWD")
    text, _ = run_build("--task", "clwd", "--manual-dir", src, "--out", tmp_path / "out")
    assert '"test": 3' in text and '"train": 2' in text
    path, name = pipeline.find_dataset_dir(str(tmp_path / "out"), "clwd")
    assert name == "clwd/default" and path.endswith(os.path.join("clwd", "default", "1.0.0"))
    b = tfds.builder_from_directory(path)
    assert b.info.splits["train"].num_examples == 2 and b.info.splits["test"].num_examples == 3
    src_test = b.as_data_source("test")
    read = lambda p: np.asarray(Image.open(p))  # noqa: E731
    d = truth[("test", "1")]
    found = set()
    for rec in src_test:  # TFDS orders records by a hash of their key: find each one's files by its composite
        k = next(k for k in (1, 2, 3) if np.array_equal(rec["composite"],
                                                        read(d / "Watermarked_image" / f"{k}.jpg")))
        found.add(k)
        np.testing.assert_array_equal(rec["background"], read(d / "Watermark_free_image" / f"{k}.jpg"))
        np.testing.assert_array_equal(rec["foreground"][..., :3], read(d / "Watermark" / f"{k}.png"))
        np.testing.assert_array_equal(rec["foreground"][..., 3], read(d / "Alpha" / f"{k}.png"))
        np.testing.assert_array_equal(rec["mask"][..., 0], read(d / "Mask" / f"{k}.png"))
        assert blend.TASKS[rec["task"]] == "watermark"
    assert found == {1, 2, 3}
    # the same folder again: reused; another folder: refused, nothing touched
    text, _ = run_build("--task", "clwd", "--manual-dir", src, "--out", tmp_path / "out")
    assert "reusing" in text
    other, _ = make_clwd_tree(tmp_path / "CLWD2", n_test=1)
    _, err = run_build("--task", "clwd", "--manual-dir", other, "--out", tmp_path / "out", rc=2)
    assert "built from another folder" in err and "--overwrite" in err


def test_clwd_pairs_by_name_across_extensions(tmp_path):
    src, _ = make_clwd_tree(tmp_path / "CLWD", n_train=0, n_test=2)
    os.rmdir(src / "train" / "Watermarked_image")  # a CLWD with only its test split
    for sub in ("Watermark_free_image", "Watermark", "Alpha", "Mask"):
        os.rmdir(src / "train" / sub)
    alpha = src / "test" / "Alpha"
    Image.open(alpha / "2.png").save(alpha / "2.bmp")  # another extension in one folder: still paired
    os.remove(alpha / "2.png")
    run_build("--task", "clwd", "--manual-dir", tmp_path, "--out", tmp_path / "out")  # the parent of CLWD/
    b = tfds.builder_from_directory(pipeline.find_dataset_dir(str(tmp_path / "out"), "clwd/default")[0])
    assert list(b.info.splits) == ["test"] and b.info.splits["test"].num_examples == 2


def test_malformed_trees_are_refused_in_one_line(tmp_path):
    src, _ = make_clwd_tree(tmp_path / "CLWD", n_train=1, n_test=3)
    os.remove(src / "test" / "Mask" / "2.png")
    out = tmp_path / "out"
    _, err = run_build("--task", "clwd", "--manual-dir", src, "--out", out, rc=2)
    line = err.strip()
    assert "\n" not in line and line.startswith("error: CLWD test:")
    assert os.path.join("test", "Mask") in line and "lacks 1" in line and "e.g. 2" in line
    assert not os.path.exists(out / "clwd")  # refused before anything was written
    # a missing folder, an extra file, a duplicate name
    os.remove(src / "test" / "Watermarked_image" / "2.jpg")
    for sub in ("Watermark_free_image", "Watermark", "Alpha"):
        os.remove(next((src / "test" / sub).glob("2.*")))
    (src / "train" / "Alpha").rename(src / "train" / "alpha_maps")
    _, err = run_build("--task", "clwd", "--manual-dir", src, "--out", out, rc=2)
    assert "no folder Alpha/" in err and err.count("\n") == 1
    with pytest.raises(public.SourceError, match="has 1 names"):
        flare = make_flare_tree(tmp_path / "F")
        save(np.zeros((S, S, 3)), flare / "test_data" / "real" / "gt" / "gt_000009.png")
        public.pair(str(flare / "test_data" / "real"), {"input": "input_", "gt": "gt_", "mask": "mask_"}, "x")
    save(np.zeros((S, S, 3)), tmp_path / "F" / "test_data" / "real" / "gt" / "gt_000000.jpg")
    _, err = run_build("--task", "flare7k", "--manual-dir", tmp_path / "F", "--out", out, rc=2)
    assert "two files for '000000'" in err
    _, err = run_build("--task", "flare7k", "--flare7k-config", "synthetic", "--manual-dir", tmp_path / "CLWD",
                       "--out", out, rc=2)
    assert "no Flare7K++ synthetic test data" in err


def test_flare7k_builder(tmp_path):
    src = make_flare_tree(tmp_path / "Flare7Kpp")
    run_build("--task", "flare7k", "--manual-dir", src, "--out", tmp_path / "out")
    path, name = pipeline.find_dataset_dir(str(tmp_path / "out"), "flare7k")
    assert name == "flare7k/real"
    b = tfds.builder_from_directory(path)
    assert list(b.info.splits) == ["test"]
    recs = b.as_data_source("test")
    assert len(recs) == 3
    for rec in recs:
        assert blend.TASKS[rec["task"]] == "flare" and rec["mask"].shape == (S, S, 3)
        comp, bg, fg = (rec[k].astype(np.float64) / 255 for k in ("composite", "background", "foreground"))
        # the stored flare layer puts the input back on the gt (the law, within 8-bit rounding)
        assert np.abs(blend.composite("flare", fg, bg) - comp).max() < 3 / 255
    assert sorted(np.unique(recs[0]["mask"].reshape(-1, 3), axis=0).tolist()) == \
        [[0, 0, 0], [0, 0, 255], [255, 0, 0], [255, 255, 0]]


# ---------------------------------------------------------------- metric definitions, by hand
def test_rmse_w_by_hand():
    from dd_jax import metrics

    a = np.zeros((2, 2, 3))
    b = np.zeros((2, 2, 3))
    b[0, 0] = [0.1, 0.2, 0.3]  # inside the mask
    b[1, 1] = [1.0, 1.0, 1.0]  # outside: must not count
    mask = np.array([[1.0, 1.0], [0.0, 0.0]])
    # two masked pixels x 3 channels: sqrt((25.5^2 + 51^2 + 76.5^2) / 6)
    expected = np.sqrt((25.5 ** 2 + 51 ** 2 + 76.5 ** 2) / 6)
    assert float(metrics.rmse_masked(a, b, mask)[0]) == pytest.approx(expected, rel=1e-5)
    # the CLWD protocol uses it with CLWD's Mask, on the 8-bit prediction
    vals = protocols.per_image("clwd", pred_bg=a[None], bg=b[None], comp=a[None], fg_rgba=np.zeros((1, 2, 2, 4)),
                               mask=mask[None, ..., None])
    assert vals["rmse_w"][0] == pytest.approx(expected, rel=1e-5)
    assert vals["rmse"][0] == pytest.approx(np.sqrt((25.5 ** 2 + 51 ** 2 + 76.5 ** 2 + 3 * 255 ** 2) / 12), rel=1e-5)
    assert "alpha_mae" not in vals  # no predicted foreground


def test_alpha_error_by_hand():
    # a watermark of colour A = 1 at alpha 0.5 over black: composite 0.5, layer rendered over grey: 0.75
    comp = np.zeros((1, 1, 2, 3))
    comp[0, 0, 0] = 0.5
    bg = np.zeros((1, 1, 2, 3))
    render = np.full((1, 1, 2, 3), 0.5)
    render[0, 0, 0] = 0.75
    fg_rgba = np.zeros((1, 1, 2, 4))
    fg_rgba[0, 0, 0] = [1, 1, 1, 0.6]  # the truth says 0.6: error 0.1 (25.5 on 0-255) on one of two pixels
    vals = protocols.per_image("clwd", pred_bg=bg, bg=bg, comp=comp, fg_rgba=fg_rgba, mask=np.ones((1, 1, 2, 1)),
                               pred_fg=render)
    e = round(0.6 * 255) - round(0.5 * 255)  # the two alphas as 8-bit values
    assert vals["alpha_mae"][0] == pytest.approx(e / 2)
    assert vals["alpha_rmse"][0] == pytest.approx(np.sqrt(e ** 2 / 2))


def test_flare7k_region_psnrs_by_hand():
    gt = np.zeros((1, 4, 4, 3))
    x = np.zeros((1, 4, 4, 3))
    mask = np.zeros((1, 4, 4, 3), np.uint8)
    mask[0, 0, :2] = (255, 255, 0)  # two glare pixels
    mask[0, 1, :] = (255, 0, 0)  # four streak pixels
    mask[0, 3, 3] = (0, 0, 255)  # one light-source pixel
    x[0, 0, 0] = 0.1  # error 0.1 on one glare pixel (3 channels)
    x[0, 1, 0] = [0.2, 0.2, 0.0]  # streak: error 0.2 on 2 channels of one pixel
    x[0, 3, 3] = 1.0  # on the light source: outside "global"
    x[0, 2, 2] = [0.3, 0.0, 0.0]  # elsewhere
    g = protocols.region_masks(mask)
    assert g["glare"].sum() == 2 and g["streak"].sum() == 4 and g["global"].sum() == 15
    # mse = sum((d m)^2) / (3 sum m) on [0, 1]; PSNR = 10 log10(1 / mse)
    exp_glare = 10 * np.log10(1 / (3 * 0.1 ** 2 / (3 * 2)))
    exp_streak = 10 * np.log10(1 / (2 * 0.2 ** 2 / (3 * 4)))
    exp_global = 10 * np.log10(1 / ((3 * 0.1 ** 2 + 2 * 0.2 ** 2 + 0.3 ** 2) / (3 * 15)))
    vals = protocols.per_image("flare7k", pred_bg=x, bg=gt, comp=x, fg_rgba=np.zeros((1, 4, 4, 4)),
                               mask=mask / 255.0)
    # the prediction is rounded to 8 bits first: 0.1 -> 26/255 ...
    q = lambda v: round(v * 255) / 255  # noqa: E731
    exp_glare_q = 10 * np.log10(1 / (3 * q(0.1) ** 2 / (3 * 2)))
    assert vals["glare_psnr"][0] == pytest.approx(exp_glare_q, rel=1e-9)
    assert protocols.masked_psnr(gt, x, g["glare"])[0] == pytest.approx(exp_glare, rel=1e-9)
    assert np.isnan(vals["ssim"][0])  # under skimage's 7x7 window: undefined (skimage refuses)
    assert protocols.masked_psnr(gt, x, g["streak"])[0] == pytest.approx(exp_streak, rel=1e-9)
    assert protocols.masked_psnr(gt, x, g["global"])[0] == pytest.approx(exp_global, rel=1e-9)
    assert np.isnan(protocols.masked_psnr(gt, x, np.zeros((1, 4, 4))))[0]
    assert protocols.masked_psnr(gt, gt, g["glare"])[0] == protocols.PSNR_CAP
    # region PSNRs average over the images holding the region; Score is the mean of the three
    s = protocols.summarize("flare7k", {"psnr": np.array([20.0, 30.0]), "glare_psnr": np.array([10.0, np.nan]),
                                        "streak_psnr": np.array([20.0, 24.0]), "global_psnr": np.array([30, 30.0])})
    assert s["glare_psnr"] == 10.0 and s["glare_psnr_n"] == 1 and s["streak_psnr"] == 22.0
    assert s["score"] == pytest.approx((10 + 22 + 30) / 3) and s["lpips"] == protocols.NA_LPIPS


def test_skimage_ssim_by_brute_force():
    rng = np.random.default_rng(3)
    a = np.rint(rng.random((1, 10, 11, 3)) * 255) / 255
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    # every 7x7 window of the reflect-padded image, sample covariance, map cropped by 3, mean over channels
    x, y = a[0] * 255, b[0] * 255
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    pad = lambda z: np.pad(z, ((3, 3), (3, 3), (0, 0)), mode="symmetric")  # noqa: E731  scipy's 'reflect'
    px, py = pad(x), pad(y)
    vals = []
    for c in range(3):
        m = []
        for i in range(3, 10 - 3):
            for j in range(3, 11 - 3):
                wx, wy = px[i:i + 7, j:j + 7, c].ravel(), py[i:i + 7, j:j + 7, c].ravel()
                mx, my = wx.mean(), wy.mean()
                vx, vy = wx.var(ddof=1), wy.var(ddof=1)
                cxy = np.sum((wx - mx) * (wy - my)) / 48
                m.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        vals.append(np.mean(m))
    assert protocols.ssim_uniform(a, b)[0] == pytest.approx(np.mean(vals), rel=1e-9)
    assert protocols.ssim_uniform(a, a)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- protocols in evaluate
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from test_evaluate_cli import SIZE, quiet, tiny_config

    from dd_jax import checkpoints, evaluate, system as system_lib

    assert SIZE == S
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    clwd_src, _ = make_clwd_tree(root / "CLWD", n_train=0, n_test=3)
    for sub in ("Watermarked_image", "Watermark_free_image", "Watermark", "Alpha", "Mask"):
        os.rmdir(clwd_src / "train" / sub)
    run_build("--task", "clwd", "--manual-dir", clwd_src, "--out", data)
    run_build("--task", "flare7k", "--manual-dir", make_flare_tree(root / "Flare7Kpp"), "--out", data)
    model = str(root / "model")
    checkpoints.export(system_lib.build(tiny_config(data)), model)
    from flax import nnx

    from dd_jax.metrics import lpips
    from dd_jax.metrics.weights import save_module

    lp_file = str(root / "lpips.safetensors")  # random weights: only the wiring is checked
    save_module(lpips.LPIPS(rngs=nnx.Rngs(3)), lp_file, lpips.FORMAT)
    out = root / "report"
    assert quiet(evaluate.main, ["--checkpoint", model, "--data", str(data), "--output", str(out),
                                 "--protocol", "flare7k", "--batch-size", "2", "--steps", "1",
                                 "--lpips-weights", lp_file]) == 0
    flare = json.load(open(out / "metrics.json"))
    clwd = quiet(evaluate.run, str(data), str(root / "clwd_report"), model, tasks=["clwd"], batch_size=2, steps=1)
    return data, out, flare, clwd, root, lpips.load(lp_file)


def stored(data, name):
    src = tfds.builder_from_directory(pipeline.find_dataset_dir(str(data), name)[0]).as_data_source("test")
    return {k: np.stack([src[i][k] for i in range(len(src))]).astype(np.float64) / 255.0
            for k in ("composite", "background", "foreground", "mask")}


def test_flare7k_protocol_in_evaluate(evaluated):
    data, out, rep, _, _, lp = evaluated
    assert list(rep["tasks"]) == ["Flare7K++-real"]  # --protocol flare7k: only the Flare7K++ datasets
    r = rep["tasks"]["Flare7K++-real"]
    p = r["protocol"]
    assert p["name"] == "flare7k" and set(p) == {"name", "identity", "model"}
    t = stored(data, "flare7k/real")
    comp, gt = t["composite"], t["background"]
    ident = p["identity"]
    assert ident["psnr"] == pytest.approx(float(np.mean(metrics.psnr(comp, gt, cap=protocols.PSNR_CAP))), rel=1e-6)
    assert ident["ssim"] == pytest.approx(np.mean(protocols.ssim_uniform(gt, comp)), rel=1e-6)
    masks = protocols.region_masks(np.rint(t["mask"] * 255).astype(np.uint8))
    for region in protocols.REGIONS:
        assert ident[f"{region}_psnr"] == pytest.approx(np.mean(protocols.masked_psnr(gt, comp, masks[region])),
                                                        rel=1e-6)
        assert ident[f"{region}_psnr_n"] == 3
    assert ident["score"] == pytest.approx(np.mean([ident[f"{g}_psnr"] for g in protocols.REGIONS]))
    from dd_jax.metrics import lpips

    # LPIPS as Flare7K's script feeds it: [0, 1] images given as they are to a network expecting [-1, 1]
    expected = lpips.distance(lp, (gt + 1) / 2, (protocols.quantize(comp) + 1) / 2)
    assert ident["lpips"] == pytest.approx(float(np.mean(expected)), rel=1e-4)
    assert all(np.isfinite(p["model"][k]) for k in ("psnr", "ssim", "lpips", "glare_psnr", "streak_psnr", "score"))
    assert len(r["per_image"]["protocol/model/glare_psnr"]) == 3
    md = open(out / "report.md").read()
    assert "## Flare7K++ protocol" in md and "G-PSNR↑" in md and "| Flare7K++-real | Model |" in md


def test_clwd_protocol_in_evaluate(evaluated):
    from dd_jax import evaluate, metrics

    data, _, _, rep, root, _ = evaluated
    r = rep["tasks"]["CLWD"]
    assert r["dataset"] == "clwd/default" and r["n"] == 3
    p = r["protocol"]
    t = stored(data, "clwd/default")
    comp, bg, m = t["composite"], t["background"], t["mask"]
    ident = p["identity"]
    f = lambda a: a.astype(np.float32)  # noqa: E731
    assert ident["rmse_w"] == pytest.approx(float(np.mean(metrics.rmse_masked(f(comp), f(bg), f(m)))), rel=1e-5)
    assert ident["rmse"] == pytest.approx(float(np.mean(metrics.rmse(f(comp), f(bg)))), rel=1e-5)
    assert ident["psnr"] == pytest.approx(float(np.mean(metrics.psnr(comp, bg, cap=protocols.PSNR_CAP))), rel=1e-6)
    # the identity predicts no watermark: alpha 0, so its alpha MAE is the mean true alpha
    assert ident["alpha_mae"] == pytest.approx(np.mean(t["foreground"][..., 3] * 255), rel=1e-6)
    assert all(np.isfinite(p["model"][k]) for k in ("psnr", "ssim", "rmse", "rmse_w", "alpha_mae", "alpha_rmse"))
    md = open(root / "clwd_report" / "report.md").read()
    assert "## CLWD protocol" in md and "RMSEw↓" in md and "| CLWD | Identity (composite) |" in md
    with pytest.raises(SystemExit):
        with redirect_stderr(io.StringIO()):
            evaluate.main(["--data", str(data), "--output", str(root / "x"), "--protocol", "clwd",
                           "--tasks", "flare7k/real"])


# ---------------------------------------------------------------- the model rows, by hand
def fake_layers(images, *a, **k):
    """A stand-in decomposition with known layers: background 0.77 c + 0.113 (not yet 8-bit; no value of an 8-bit
    c lands on a rounding tie), rendering 0.5 c + 0.25."""
    from dd_jax import inference

    return [inference.Layers(c, np.clip(0.77 * c + 0.113, 0, 1).astype(np.float32), (0.5 * c + 0.25).astype(np.float32))
            for c in images]


@pytest.fixture(scope="module")
def faked(evaluated):
    """Both protocols evaluated with `fake_layers` as the model's predictions."""
    from dd_jax import evaluate, inference

    data, _, _, _, root, _ = evaluated
    model = str(root / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "decompose_images", lambda system, images, tasks, **k: fake_layers(images))
        flare = quiet_run(evaluate.run, str(data), str(root / "fake_flare"), model, tasks=["flare7k/real"],
                          batch_size=2, steps=1, lpips_weights=str(root / "lpips.safetensors"))
        clwd = quiet_run(evaluate.run, str(data), str(root / "fake_clwd"), model, tasks=["clwd"], batch_size=2,
                         steps=1)
    return flare["tasks"]["Flare7K++-real"]["protocol"]["model"], clwd["tasks"]["CLWD"]["protocol"]["model"]


def quiet_run(fn, *a, **k):
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return fn(*a, **k)


def seen(data, name):
    """The composites as evaluate reads them (float32 through the data pipeline: k / 255 to float32 rounding)."""
    ex = pipeline.Examples(str(data), name, "test")
    return np.stack([ex[i]["composite"] for i in range(len(ex))])


def hand_8bit(x):
    return np.rint(np.clip(x, 0, 1) * 255) / 255


def hand_psnr(y, t):
    """10 log10(1 / mse) per image, on [0, 1] (the 8-bit images' skimage PSNR with data range 255)."""
    return np.minimum(10 * np.log10(1 / np.mean((y - t) ** 2, axis=(1, 2, 3))), 100.0)


def test_flare7k_model_row_by_hand(evaluated, faked):
    from dd_jax.metrics import lpips

    data, _, _, _, _, lp = evaluated
    model, _ = faked
    t = stored(data, "flare7k/real")
    gt, comp = t["background"], seen(data, "flare7k/real")
    y = hand_8bit(0.77 * comp + 0.113)  # the prediction as a saved 8-bit PNG reads back
    assert model["psnr"] == pytest.approx(np.mean(hand_psnr(y, gt)), rel=1e-6)
    assert model["ssim"] == pytest.approx(np.mean(protocols.ssim_uniform(gt, y)), rel=1e-6)  # brute-forced above
    assert model["lpips"] == pytest.approx(float(np.mean(lpips.distance(lp, (gt + 1) / 2, (y + 1) / 2))), rel=1e-4)
    mask = np.rint(t["mask"] * 255)  # colour-coded: glare (255, 255, 0), streak (255, 0, 0), light (0, 0, 255)
    regions = {"glare": mask[..., 1] / 255, "streak": np.clip(mask[..., 0] - mask[..., 1], 0, None) / 255,
               "global": (255 - mask[..., 2]) / 255}
    for name, m in regions.items():
        mse = np.sum(((y - gt) * m[..., None]) ** 2, axis=(1, 2, 3)) / (3 * m.sum(axis=(1, 2)))
        want = np.mean(np.minimum(10 * np.log10(1 / mse), 100.0))
        assert model[f"{name}_psnr"] == pytest.approx(want, rel=1e-6), name
        assert model[f"{name}_psnr_n"] == 3
    assert model["score"] == pytest.approx(np.mean([model[f"{r}_psnr"] for r in protocols.REGIONS]), rel=1e-9)
    assert model["psnr"] != pytest.approx(np.mean(hand_psnr(0.77 * comp + 0.113, gt)), rel=1e-6)  # 8-bit matters


def test_clwd_model_row_by_hand(evaluated, faked):
    data, _, _, _, _, _ = evaluated
    _, model = faked
    t = stored(data, "clwd/default")
    bg, comp, m = t["background"], seen(data, "clwd/default"), t["mask"][..., 0]
    y = hand_8bit(0.77 * comp + 0.113)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    assert model["psnr"] == pytest.approx(np.mean(hand_psnr(y, bg)), rel=1e-5)
    assert model["ssim"] == pytest.approx(float(np.mean(metrics.ssim(f(y), f(bg), zero_pad=True))), rel=1e-5)
    assert model["rmse"] == pytest.approx(np.mean(np.sqrt(np.mean(((y - bg) * 255) ** 2, axis=(1, 2, 3)))), rel=1e-5)
    rmse_w = np.sqrt(np.sum(((y - bg) * 255 * m[..., None]) ** 2, axis=(1, 2, 3)) / (3 * m.sum(axis=(1, 2))))
    assert model["rmse_w"] == pytest.approx(np.mean(rmse_w), rel=1e-5)
    # the layer's alpha, as decompose saves it, against CLWD's Alpha: both as 8-bit values
    render = (0.5 * comp + 0.25).astype(np.float64)
    alpha = np.asarray(blend.foreground_rgba("watermark", render, comp.astype(np.float64), y))[..., 3]
    err = np.rint(np.clip(alpha, 0, 1) * 255) - np.rint(t["foreground"][..., 3] * 255)
    assert np.abs(err).max() > 0
    assert model["alpha_mae"] == pytest.approx(np.mean(np.abs(err).mean(axis=(1, 2))), rel=1e-6)
    assert model["alpha_rmse"] == pytest.approx(np.mean(np.sqrt((err ** 2).mean(axis=(1, 2)))), rel=1e-6)
