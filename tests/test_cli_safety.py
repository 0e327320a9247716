"""The CLIs never destroy what they did not make, refuse nonsense clearly, and run no code from data files.

convert_flux --overwrite (marker file, temporary sibling, permissions, kills), data.build (stored
parameters, kills at random points, negative counts, unusable user folders), TFDS features.json and
TorchScript files (code that would run at load).
"""

import importlib.util
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import redirect_stderr

import numpy as np
import pytest
from cli_run import run_main
from PIL import Image

from dd_jax.models import flux, store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + sys.path), JAX_PLATFORMS="cpu")


# ------------------------------------------------------------------ 1. convert_flux --overwrite
PARAMS = flux.FluxParams(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=32,
                         mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                         theta=10_000, qkv_bias=True, guidance_embed=False)


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    """A tiny random BFL single-file transformer (names = our paths, torch's [out, in] layout)."""
    import flux_reference as fr
    from safetensors.numpy import save_file

    state = fr.random_bfl_state(PARAMS, seed=0, scale=0.1)
    path = tmp_path_factory.mktemp("bfl") / "flux1-tiny.safetensors"
    save_file(state, str(path))
    return str(path)


def convert(*argv):
    from weights_conversion import convert as conv

    return run_main(conv.main, [*argv, "--axes-dim", "4,6,6", "--quiet"])


def test_overwrite_refuses_a_folder_the_converter_did_not_write(bfl_file, tmp_path):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "photos" / "a.jpg").write_bytes(b"jpeg")
    rc, _, err = convert("--source", bfl_file, "--output", out, "--overwrite")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and store.META_FILE in lines[0], err
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "photos" / "a.jpg").exists()
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary folder left behind
    # a file in the way is refused the same way
    (tmp_path / "file").write_text("x")
    assert convert("--source", bfl_file, "--output", tmp_path / "file", "--overwrite")[0] == 2
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_replaces_its_own_model_folder_with_normal_permissions(bfl_file, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "tr"
        assert convert("--source", bfl_file, "--output", out)[0] == 0
        first = store.read_meta(str(out))
        assert convert("--source", bfl_file, "--output", out)[0] == 2  # exists, no --overwrite
        rc, _, err = convert("--source", bfl_file, "--output", out, "--overwrite", "--dtype", "bfloat16")
        assert rc == 0, err
    finally:
        os.umask(old)
    assert store.read_meta(str(out))["dtype"] == "bfloat16" != first["dtype"]
    assert flux.load(str(out)).params.hidden_size == 32
    assert sorted(os.listdir(out.parent)) == ["tr"]  # the replaced folder and temporaries are gone
    for root, dirs, files in os.walk(tmp_path / "new"):
        for d in [root] + [os.path.join(root, d) for d in dirs]:
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d  # not 700: the umask decides
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) & 0o044 == 0o044, f


def _is_complete_model(path) -> bool:
    try:
        store.read_meta(str(path))
    except (FileNotFoundError, ValueError):
        return False
    flux.load(str(path))  # a folder that reads as complete must load
    return True


@pytest.mark.parametrize("seed", [0, 1])
def test_conversion_killed_at_a_random_point_leaves_nothing_complete(bfl_file, tmp_path, seed):
    rng = np.random.default_rng(seed)
    out = tmp_path / "tr"
    if seed == 1:  # replacing an existing model folder
        assert convert("--source", bfl_file, "--output", out)[0] == 0
    cmd = [sys.executable, os.path.join(REPO, "scripts", "convert_flux.py"), "--source", bfl_file,
           "--output", str(out), "--axes-dim", "4,6,6", "--quiet", "--overwrite", "--dtype", "bfloat16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any(
                n.startswith(".tr.") for n in os.listdir(tmp_path)):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # a random point while writing (or after it ended)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if out.exists():
        assert _is_complete_model(out), os.listdir(out)
    for name in os.listdir(tmp_path):  # leftovers are hidden siblings, never under the final name
        assert name == "tr" or name.startswith((".tr.partial-", ".tr.replaced-")), name
    rc, _, err = convert("--source", bfl_file, "--output", out, "--overwrite")
    assert rc == 0, err
    assert _is_complete_model(out) and store.read_meta(str(out))["dtype"] == "float32"


# ------------------------------------------------------------------ 5, 9. data.build
def build(*argv):
    from dd_jax.data import build as b

    return run_main(b.main, argv)


def test_build_refuses_a_dataset_built_with_other_parameters(tmp_path):
    out = tmp_path / "ds"
    base = ["--task", "watermark", "--out", out, "--test", 0]
    assert build(*base, "--size", 32, "--train", 2)[0] == 0
    rc, _, err = build(*base, "--size", 48, "--train", 3, "--seed", 7)
    assert rc == 2
    for word in ("height: 32 -> 48", "width: 32 -> 48", "train examples: 2 -> 3", "seed: 0 -> 7", "--overwrite"):
        assert word in err, err
    import tensorflow_datasets as tfds

    from dd_jax.data import pipeline

    path, _ = pipeline.find_dataset_dir(str(out), "watermark")
    assert tfds.builder_from_directory(path).info.metadata["height"] == 32  # kept, untouched
    rc, text, _ = build(*base, "--size", 32, "--train", 2)  # the same parameters: reused, said so
    assert rc == 0 and "already built" in text
    assert build(*base, "--size", 48, "--train", 3, "--seed", 7, "--overwrite")[0] == 0
    info = tfds.builder_from_directory(path).info
    assert info.metadata["height"] == 48 and info.splits["train"].num_examples == 3


def test_build_refuses_a_folder_in_place_of_the_dataset(tmp_path):
    stray = tmp_path / "ds" / "alphablend" / "watermark" / "1.0.0"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        rc, _, err = build("--task", "watermark", "--out", tmp_path / "ds", "--size", 32, "--train", 2,
                           "--test", 0, *extra)
        assert rc == 2 and str(stray) in err
    assert (stray / "notes.txt").read_text() == "mine"


def _dataset_state(out, n):
    """'absent' or 'complete' (all n train records read back); anything else fails."""
    from dd_jax.data import pipeline

    try:
        src, _ = pipeline.open_source(str(out), "occlusion", "train")
    except FileNotFoundError:
        return "absent"
    assert len(src) == n
    for i in range(n):
        assert src[i]["composite"].shape == (32, 32, 3)
    return "complete"


@pytest.mark.parametrize("seed", [3, 4])
def test_build_killed_at_a_random_point(tmp_path, seed):
    rng = np.random.default_rng(seed)
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "dd_jax.data.build", "--task", "occlusion", "--out", str(out), "--train", "60",
           "--test", "0", "--size", "32"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    task_dir = out / "alphablend" / "occlusion"
    try:
        while time.time() - t0 < 120 and proc.poll() is None and not any(task_dir.glob("incomplete*")):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))  # somewhere while writing examples, or after
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _dataset_state(out, 60)  # absent or complete, never partial
    rc, _, err = build("--task", "occlusion", "--out", out, "--train", 60, "--test", 0, "--size", 32)
    assert rc == 0, err
    assert _dataset_state(out, 60) == "complete"


def test_reader_ignores_a_build_killed_just_before_its_rename(tmp_path):
    """TFDS writes dataset_info.json into incomplete.* and then renames it: a kill between the two must
    not leave something a reader takes for the dataset."""
    from dd_jax.data import pipeline

    out = tmp_path / "ds"
    assert build("--task", "xray", "--out", out, "--size", 32, "--train", 2, "--test", 0)[0] == 0
    task_dir = out / "alphablend" / "xray"
    shutil.copytree(task_dir / "1.0.0", task_dir / "incomplete.ab12cd")
    assert pipeline.find_dataset_dir(str(out), "xray")[0] == str(task_dir / "1.0.0")
    shutil.rmtree(task_dir / "1.0.0")
    with pytest.raises(FileNotFoundError):
        pipeline.find_dataset_dir(str(out), "xray")


@pytest.mark.parametrize("flag", ["--train", "--test", "--workers"])
def test_build_refuses_negative_counts(flag):
    from dd_jax.data import build as b

    with pytest.raises(SystemExit) as e, redirect_stderr(io.StringIO()) as err:
        b.parse_args(["--task", "xray", "--out", "x", flag, "-5"])
    assert e.value.code == 2 and flag in err.getvalue()


def test_build_refuses_user_folders_without_a_usable_image(tmp_path):
    bg = tmp_path / "bg"
    bg.mkdir()
    a = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (bg / "cut.png").write_bytes(data[: len(data) // 2])  # a valid header, truncated data
    Image.fromarray(a[:8, :8]).save(bg / "tiny.png")
    base = ["--task", "watermark", "--out", tmp_path / "out", "--size", 32, "--train", 2, "--test", 0]
    rc, _, err = build(*base, "--backgrounds", bg)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert str(bg) in lines[0] and "corrupt" in lines[0] and "tiny" in lines[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = build(*base, "--backgrounds", empty)
    assert rc == 2 and str(empty) in err and "no image files" in err
    rc, _, err = build(*base, "--backgrounds", tmp_path / "missing")
    assert rc == 2 and "missing" in err
    fg = tmp_path / "fg"
    fg.mkdir()
    Image.fromarray(a).save(fg / "opaque.jpg")  # watermarks need alpha
    rc, _, err = build(*base, "--foregrounds", fg)
    assert rc == 2 and str(fg) in err and "no_alpha" in err
    assert not (tmp_path / "out" / "alphablend" / "watermark" / "1.0.0").exists()


# ------------------------------------------------------------------ 10. code in data files
def test_features_json_naming_another_module_is_refused_before_tfds_reads_it(tmp_path, monkeypatch):
    from dd_jax.data import pipeline

    out = tmp_path / "ds"
    assert build("--task", "xray", "--out", out, "--size", 32, "--train", 2, "--test", 0)[0] == 0
    path, _ = pipeline.find_dataset_dir(str(out), "xray")
    pipeline.open_source(str(out), "xray", "train")  # ours: accepted
    mod = tmp_path / "mods"
    mod.mkdir()
    marker = tmp_path / "ran"
    (mod / "evil_feature_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass F: pass\n")
    monkeypatch.syspath_prepend(str(mod))
    fj = os.path.join(path, "features.json")
    spec = json.load(open(fj))
    spec["featuresDict"]["features"]["caption"]["pythonClassName"] = "evil_feature_mod.F"
    json.dump(spec, open(fj, "w"))
    with pytest.raises(ValueError, match="features.json") as e:
        pipeline.open_source(str(out), "xray", "train")
    assert "evil_feature_mod.F" in str(e.value)
    assert not marker.exists()
    open(fj, "w").write("{not json")
    with pytest.raises(ValueError, match="features.json"):
        pipeline.find_dataset_dir(str(out), "xray")


def _metrics_script():
    spec = importlib.util.spec_from_file_location("convert_metrics_weights",
                                                  os.path.join(REPO, "scripts", "convert_metrics_weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchscript_is_refused_without_an_explicit_flag(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x * 2

    ts = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(ts))
    loaded = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or real(*a, **k))
    script = _metrics_script()
    rc, _, err = run_main(script.main, ["inception", "--torch", ts, "--out", tmp_path / "w.safetensors"])
    assert rc == 2 and not loaded
    assert "TorchScript" in err and "--trust-torchscript" in err and str(ts) in err
    assert not (tmp_path / "w.safetensors").exists()
    # with the flag it is loaded (and then refused as the wrong network, cleanly)
    rc, _, err = run_main(script.main, ["inception", "--torch", ts, "--trust-torchscript",
                                        "--out", tmp_path / "w.safetensors"])
    assert loaded and rc == 2 and str(ts) in err
    assert "TorchScript" in script.__doc__ or "code" in script.__doc__
