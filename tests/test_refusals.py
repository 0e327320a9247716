"""Issue 25, round 2: inputs that used to lose data or memory are refused first, in one line, with exit status 2.

A config of another architecture than the model's (it built a 12B flux-dev, then ran out of memory), models with
NaN weights (black layers, exit 0), inputs too large for the memory there is, and the user errors of the CLIs.
"""

import json
import os

import pytest
from cli_run import run_main

from dd_jax import checkpoints, decompose, evaluate, system as system_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATERMARK = os.path.join(REPO, "configs", "watermark.py")  # flux-dev + LoRA: not the shipped tiny model


@pytest.fixture
def no_build(monkeypatch):
    """Building a model fails the test: the checks under test must come before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(system_lib, "build", refuse)


def error_line(err: str) -> str:
    lines = [s for s in err.strip().splitlines() if s.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ 1. a config of another architecture
def test_decompose_refuses_a_config_of_another_architecture_before_building(tmp_path, no_build):
    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    rc, _, err = run_main(decompose.main, ["--input", img, "--output", tmp_path / "out", "--config", WATERMARK])
    line = error_line(err)
    assert rc == 2, err
    assert "model.preset: 'tiny' -> 'flux-dev'" in line and "text.kind" in line and WATERMARK in line, line
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_config_of_another_architecture_before_building(tmp_path, no_build):
    rc, _, err = run_main(evaluate.main, ["--data", tmp_path, "--output", tmp_path / "report",
                                          "--config", WATERMARK])
    assert rc == 2 and "model.preset: 'tiny' -> 'flux-dev'" in error_line(err), err


def test_a_run_is_checked_against_its_config_json(tmp_path, no_build):
    from dd_jax import config as config_lib

    meta = checkpoints.read_model_meta(checkpoints.DEFAULT_MODEL)
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoints.CONFIG_FILE).write_text(json.dumps(meta["config"]))
    with pytest.raises(checkpoints.RunError, match="model.preset: 'tiny' -> 'flux-dev'"):
        checkpoints.load_trained(str(run), config_lib.load_config_file(WATERMARK))
    # the same architecture with other settings (data, steps) passes the check and goes on to load
    same = config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    same.sample.steps = 7
    with pytest.raises(AssertionError, match="was built"):
        checkpoints.load_trained(str(run), same)


# ------------------------------------------------------------------ 3. NaN weights, NaN outputs
@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The shipped model with one NaN in one parameter."""
    import numpy as np

    from dd_jax.models import store

    flat, config = checkpoints.read_trained_flat(checkpoints.DEFAULT_MODEL, log=lambda s: None)
    name = sorted(flat)[len(flat) // 2]
    flat[name] = flat[name].copy()
    flat[name].reshape(-1)[3] = np.nan
    out = str(tmp_path_factory.mktemp("nan") / "model")
    store.write_flat(out, flat, model="decomposer", config=config, dtype="float32")
    return out, name


def image(path, size=(24, 16)):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8)).save(path)
    return path


def test_a_model_with_nan_weights_is_refused_at_load(nan_model, tmp_path):
    model, name = nan_model
    src = image(tmp_path / "holiday.png")  # no task in the name: the automatic choice would score NaN
    rc, _, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "out", "--checkpoint", model])
    line = error_line(err)
    assert rc == 2 and repr(name) in line and "NaN" in line and model in line, err
    assert not (tmp_path / "out").exists()


def test_non_finite_outputs_stop_the_run_instead_of_writing_black_layers(tmp_path, monkeypatch):
    import jax.numpy as jnp

    real = system_lib.decompose

    def nan_layers(*a, **k):
        return {name: jnp.full_like(v, jnp.nan) for name, v in real(*a, **k).items()}

    monkeypatch.setattr(system_lib, "decompose", nan_layers)
    for name, extra in (("watermark_a.png", []), ("holiday.png", [])):  # the task given by the name / chosen
        src = image(tmp_path / name)
        out = tmp_path / f"out_{name}"
        rc, _, err = run_main(decompose.main, ["--input", src, "--output", out, *extra])
        line = error_line(err)
        assert rc == 2 and "NaN or inf" in line and "kept" in line, err
        assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".png")], os.listdir(out)
        assert "chosen automatically" not in err


def test_convert_flux_refuses_a_checkpoint_with_nan_naming_the_tensor(tmp_path):
    import flux_reference as fr
    import numpy as np
    from safetensors.numpy import save_file

    from dd_jax.models import flux
    from weights_conversion import convert

    params = flux.FluxParams(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=32,
                             mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6),
                             theta=10_000, qkv_bias=True, guidance_embed=False)
    state = fr.random_bfl_state(params, seed=0, scale=0.1)
    name = sorted(k for k in state if k.endswith(".weight"))[2]
    state[name] = state[name].copy()
    state[name].reshape(-1)[5] = np.inf
    src = tmp_path / "flux1-tiny.safetensors"
    save_file(state, str(src))
    base = ["--source", src, "--axes-dim", "4,6,6", "--quiet"]
    rc, _, err = run_main(convert.main, [*base, "--output", tmp_path / "out"])
    line = error_line(err)
    assert rc == 2 and repr(name) in line and "NaN or inf" in line and "--allow-non-finite" in line, err
    assert sorted(os.listdir(tmp_path)) == ["flux1-tiny.safetensors"]  # nothing left, not even a temporary
    rc, _, err = run_main(convert.main, [*base, "--output", tmp_path / "out", "--allow-non-finite"])
    assert rc == 0 and "warning:" in err and repr(name) in err, err
    # a finite value beyond float16's range becomes inf in the cast: refused the same way, naming the parameter
    state[name].reshape(-1)[5] = 1e6
    save_file(state, str(src))
    rc, _, err = run_main(convert.main, [*base, "--output", tmp_path / "half", "--dtype", "float16"])
    assert rc == 2 and repr(name) in error_line(err) and "float16" in err, err


# ------------------------------------------------------------------ 2. memory bounded by the input's size
def flat_png(path, w, h):
    """A large, mostly flat PNG: small on disk, many pixels."""
    import numpy as np
    from PIL import Image

    a = np.full((h, w, 3), 90, np.uint8)
    a[h // 3:h // 2, w // 4:w // 2] = (200, 180, 40)
    Image.fromarray(a).save(path)
    return path


def test_an_input_too_large_for_the_memory_available_is_refused_before_decoding(tmp_path, monkeypatch):
    from dd_jax.data import images

    decoded = []
    real = images.read_rgb
    monkeypatch.setattr(images, "read_rgb", lambda path, **k: decoded.append(path) or real(path, **k))
    monkeypatch.setattr(decompose, "available_memory", lambda: 20_000_000)  # 20 MB
    src = flat_png(tmp_path / "watermark_big.png", 1500, 1000)
    assert os.path.getsize(src) < 100_000
    rc, _, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "out"])
    lines = [s for s in err.splitlines() if s.startswith("skipping")]
    assert rc == 1 and len(lines) == 1 and not decoded, err
    for part in ("1500x1000 (1.5 Mpx)", "GB to decompose in resize mode", "bytes a pixel", "memory available",
                 "--max-pixels 1500000"):
        assert part in lines[0], lines[0]
    # --max-pixels decides instead of the estimate: over it refused, at it decoded and written
    rc, _, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "out", "--max-pixels", 1000])
    assert rc == 1 and "more than --max-pixels 1000" in err and not decoded, err
    rc, _, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "out", "--max-pixels", 1500000])
    assert rc == 0 and decoded, err
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".png")) == [
        "watermark_big_background.png", "watermark_big_foreground.png"]


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_host_memory_per_input_pixel(tmp_path, monkeypatch, mode):
    """numpy's peak (tracemalloc) while decomposing a 3 Mpx input with a pointwise fake model: the float32 input
    and layers, the 8-bit layers and blocks of rows. It was 148 (resize) and 241 (tile) bytes a pixel with
    full-size float64 temporaries, besides JAX's copies, which tracemalloc does not see."""
    import tracemalloc

    import fake_model

    fake_model.patch(monkeypatch)
    import ml_collections

    fake = fake_model.FakeSystem(16)
    fake.config.model = ml_collections.ConfigDict({"quantize": ""})
    monkeypatch.setattr(decompose.checkpoints, "load_trained", lambda *a, **k: fake)
    monkeypatch.setattr(decompose.inference, "load_task_head", lambda *a, **k: None)
    w, h = 2000, 1500
    src = flat_png(tmp_path / "watermark_x.png", w, h)
    tracemalloc.start()
    try:
        decompose.run([str(src)], str(tmp_path / "out"), mode=mode, batch_size=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the estimate decompose refuses inputs by: what an input of this size was measured to take, and what
    # temporaries a block of rows takes (peaks measured: resize 53, tile 76 bytes a pixel; before, 148 and 241)
    assert peak < decompose.memory_estimate(w * h, mode), peak / (w * h)


# ------------------------------------------------------------------ 4. user errors: one line, exit status 2
BAD_CONFIGS = {
    "syntax.py": ("def get_config(:\n    pass\n", "syntax.py:1: syntax error"),
    "raises.py": ("def get_config():\n    raise RuntimeError('boom')\n", "get_config() raised RuntimeError: boom"),
    "noget.py": ("X = 1\n", "no get_config() function"),
    "imports.py": ("import not_a_module_xyz\n", "ModuleNotFoundError: No module named 'not_a_module_xyz'"),
    "none.py": ("def get_config():\n    pass\n", "returned None"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_config_files_with_errors_are_one_line(tmp_path, no_build, name):
    text, expected = BAD_CONFIGS[name]
    cfg = tmp_path / name
    cfg.write_text(text)
    img = image(tmp_path / "watermark_a.png")
    for main, argv in ((decompose.main, ["--input", img, "--output", tmp_path / "out"]),
                       (evaluate.main, ["--data", tmp_path, "--output", tmp_path / "report"])):
        rc, _, err = run_main(main, [*argv, "--config", cfg])
        assert rc == 2 and err.strip() == error_line(err) and expected in err and str(cfg) in err, err


def test_a_misspelled_config_path_names_the_close_match(tmp_path, no_build):
    img = image(tmp_path / "watermark_a.png")
    rc, _, err = run_main(decompose.main, ["--input", img, "--output", tmp_path / "out", "--config",
                                           os.path.join(REPO, "configs", "tinny.py")])
    assert rc == 2 and "did you mean" in err and os.path.join(REPO, "configs", "tiny.py") in err, err


def test_usage_errors_are_one_line(tmp_path, no_build):
    img = image(tmp_path / "watermark_a.png")
    base = ["--input", img, "--output", tmp_path / "out"]
    for argv, expected in (([*base, "--config.sample.steps=3"], "no --config.FIELD overrides"),
                           ([*base, "--num-samples", "0"], "--num-samples"),
                           ([*base, "--select", "recompose"], "nothing to choose"),
                           ([*base, "--mode", "tiles"], "invalid choice")):
        rc, _, err = run_main(decompose.main, argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err, (argv, err)
    from weights_conversion import convert

    rc, _, err = run_main(convert.main, ["--source", img, "--output", tmp_path / "c", "--axes-dim", "1,x"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "16,56,56" in err, err


def test_a_mistyped_input_is_refused_with_its_close_match(tmp_path, no_build):
    image(tmp_path / "watermark_a.png")
    rc, _, err = run_main(decompose.main, ["--input", tmp_path / "watermak_a.png", "--output", tmp_path / "out"])
    assert rc == 2 and err.strip() == error_line(err), err
    assert "no such file" in err and f"did you mean {tmp_path / 'watermark_a.png'}?" in err, err
    rc, _, err = run_main(evaluate.main, ["--data", tmp_path / "dta", "--output", tmp_path / "report"])
    assert rc == 2 and "--data" in error_line(err) and "no such file or folder" in err, err
    from weights_conversion import convert

    rc, _, err = run_main(convert.main, ["--source", tmp_path / "watermark_a.pngg", "--output", tmp_path / "c"])
    assert rc == 2 and f"did you mean {tmp_path / 'watermark_a.png'}?" in error_line(err), err


def test_a_folder_lists_every_format_the_reader_reads(tmp_path, monkeypatch):
    import fake_model
    import ml_collections
    import numpy as np
    from PIL import Image

    from dd_jax.data import images

    fake_model.patch(monkeypatch)
    fake = fake_model.FakeSystem(16)
    fake.config.model = ml_collections.ConfigDict({"quantize": ""})
    monkeypatch.setattr(decompose.checkpoints, "load_trained", lambda *a, **k: fake)
    monkeypatch.setattr(decompose.inference, "load_task_head", lambda *a, **k: None)
    src = tmp_path / "in"
    src.mkdir()
    exts = sorted(images.IMAGE_EXTS)
    for ext in exts:
        Image.fromarray(np.full((12, 12, 3), 100, np.uint8)).save(src / f"watermark_{ext[1:]}{ext}")
    (src / "._watermark_x.png").write_bytes(b"a macOS resource fork, not an image")
    (src / "notes.txt").write_text("not an image")
    assert decompose.list_inputs([str(src)]) == [str(src / f"watermark_{e[1:]}{e}") for e in exts]
    rc, _, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "out"])
    assert rc == 0 and "skipping" not in err, err


def test_options_the_run_would_ignore_are_refused(tmp_path):
    img = image(tmp_path / "watermark_a.png")
    base = ["--input", img, "--output", tmp_path / "out"]  # the shipped model: resize mode, task conditioning
    for extra, expected in ((["--overlap", "8"], "--overlap 8 applies to --mode tile only"),
                            (["--mode", "tile", "--no-detail-transfer"], "--no-detail-transfer applies"),
                            (["--prompt", "remove the logo"], "--prompt: this model is conditioned on the task"),
                            (["--guidance", "4"], "--guidance 4: this model has no guidance input")):
        rc, _, err = run_main(decompose.main, [*base, *extra])
        assert rc == 2 and expected in error_line(err) and not (tmp_path / "out").exists(), (extra, err)
    rc, _, err = run_main(evaluate.main, ["--data", tmp_path, "--output", tmp_path / "r", "--overlap", "8"])
    assert rc == 2 and "--overlap 8 applies to --mode tile only" in error_line(err), err
