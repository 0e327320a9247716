"""decompose and evaluate never lose what is in their output folder (issue 25): one run at a time per folder, no
file replaced by a race, one bad file name does not stop a batch, an interrupted run can be finished. A pointwise
fake model stands in for the network."""

import glob
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import fake_model
import numpy as np
import pytest
from PIL import Image

from dd_jax import decompose, evaluate

TILE = 16


@pytest.fixture
def fake(monkeypatch):
    return fake_model.patch_decompose(monkeypatch, TILE)


def run_main(main, argv):
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error")]


def images(folder, *names, size=TILE):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / name)
    return folder


def sidecars(folder) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, decompose.SIDECAR_PREFIX + "*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def save_hook(monkeypatch, on_first):
    """Calls `on_first()` when decompose writes its first PNG (before the file is in place)."""
    real, state = Image.Image.save, {"done": False}

    def save(self, fp, *a, **k):
        if not state["done"]:
            state["done"] = True
            on_first()
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)


# ------------------------------------------------------------------ one run at a time, no file replaced by a race
def test_a_second_run_on_the_same_folder_fails_at_once(fake, tmp_path, monkeypatch):
    src = images(tmp_path / "in", "xray_a.png", "xray_b.png")
    out = tmp_path / "out"
    second = []
    save_hook(monkeypatch, lambda: second.append(run_main(decompose.main, ["--input", src, "--output", out])))
    rc, err = run_main(decompose.main, ["--input", src, "--output", out])
    assert rc == 0, err
    (rc2, err2), = second
    lines = err2.strip().splitlines()
    assert rc2 == 2 and len(lines) == 1, err2
    assert lines[0] == f"error: {out} is in use by another decompose run (pid {os.getpid()}); wait for it to end " \
                       f"or choose another --output"
    names = sorted(f for f in os.listdir(out) if not f.startswith(decompose.SIDECAR_PREFIX))
    assert names == ["xray_a_background.png", "xray_a_foreground.png", "xray_b_background.png",
                     "xray_b_foreground.png"]  # the lock file is gone
    assert len(sidecars(out)) == 1


def test_evaluate_shares_the_lock(tmp_path):
    from dd_jax import outdir

    out = tmp_path / "out"
    with outdir.locked(str(out), "decompose"):
        rc, err = run_main(evaluate.main, ["--data", tmp_path / "none", "--output", out])
        assert rc == 2 and errors(err) == [f"error: {out} is in use by another decompose run (pid {os.getpid()}); "
                                           f"wait for it to end or choose another --output"], err
    assert not out.exists()  # made for the lock, removed with it


def test_a_file_that_appears_during_the_run_is_kept(fake, tmp_path, monkeypatch):
    """Another program writes one of the outputs after the run checked: it is kept, the run stops (exit 2)."""
    src = images(tmp_path / "in", "xray_a.png")
    out = tmp_path / "out"
    save_hook(monkeypatch, lambda: (out / "xray_a_background.png").write_bytes(b"theirs"))
    rc, err = run_main(decompose.main, ["--input", src, "--output", out])
    assert rc == 2 and len(errors(err)) == 1, err
    assert "xray_a_background.png appeared during the run" in errors(err)[0]
    assert (out / "xray_a_background.png").read_bytes() == b"theirs"
    assert sorted(os.listdir(out)) == ["xray_a_background.png"]  # nothing half-written, no temporary file


# ------------------------------------------------------------------ one bad file name does not stop the batch
@pytest.mark.parametrize("long_stem", ["x" * 245, "é" * 123], ids=["ascii", "utf8"])
def test_an_over_long_name_is_shortened_and_the_batch_goes_on(fake, tmp_path, long_stem):
    """`<stem>_background.png` over NAME_MAX (255 bytes): written under a shortened stem (the same every run,
    announced, in the sidecar); the inputs after it are decomposed and the sidecar is written."""
    src = images(tmp_path / "in", "a.png", long_stem + ".png", "z.png")
    assert len(os.fsencode(long_stem + "_background.png")) > 255
    out = tmp_path / "out"
    rc, err = run_main(decompose.main, ["--input", src, "--output", out, "--task", "xray"])
    assert rc == 0, err
    names = sorted(f for f in os.listdir(out) if not f.startswith(decompose.SIDECAR_PREFIX))
    assert len(names) == 6 and all(len(os.fsencode(n)) <= 255 for n in names)
    assert {"a_background.png", "a_foreground.png", "z_background.png", "z_foreground.png"} < set(names)
    (report,) = sidecars(out)
    (rec,) = [r for r in report["images"] if r["input"] == str(src / (long_stem + ".png"))]
    short = rec["outputs"]["background"]
    assert short in names and short.startswith(long_stem[:100]) and short.endswith("_background.png")
    assert rec["names_shortened"] and rec["outputs"]["foreground"] in names
    assert [line for line in err.splitlines() if "too long" in line and short[:-len("_background.png")] in line]
    with Image.open(out / short) as im:
        assert im.size == (TILE, TILE)
    # the same names in a second run
    rc, err = run_main(decompose.main, ["--input", src, "--output", tmp_path / "again", "--task", "xray"])
    assert rc == 0 and sorted(f for f in os.listdir(tmp_path / "again")
                              if not f.startswith(decompose.SIDECAR_PREFIX)) == names


def test_a_name_the_file_system_refuses_skips_that_input(fake, tmp_path, monkeypatch):
    """An output name refused by the file system (here an injected EILSEQ): that input is skipped with one line,
    the rest of the batch is written, the sidecar lists it as skipped, exit status 1 (some inputs failed)."""
    import errno

    src = images(tmp_path / "in", "a.png", "b.png", "c.png")
    out = tmp_path / "out"
    real = Image.Image.save

    def save(self, fp, *a, **k):
        if os.path.basename(str(fp)).startswith(".b_"):
            raise OSError(errno.EILSEQ, "Invalid or incomplete multibyte or wide character", str(fp))
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    rc, err = run_main(decompose.main, ["--input", src, "--output", out, "--task", "xray"])
    assert rc == 1, err
    skips = [line for line in err.splitlines() if line.startswith("skipping")]
    assert len(skips) == 1 and str(src / "b.png") in skips[0] and "refuses the name" in skips[0], err
    assert not errors(err)
    assert sorted(f for f in os.listdir(out) if not f.startswith(decompose.SIDECAR_PREFIX)) == [
        "a_background.png", "a_foreground.png", "c_background.png", "c_foreground.png"]
    (report,) = sidecars(out)
    assert report["skipped"] == [str(src / "b.png")] and len(report["images"]) == 2


# ------------------------------------------------------------------ Ctrl-C, then finish the rest
def test_an_interrupted_run_is_finished_by_rerunning_with_skip_existing(fake, tmp_path, monkeypatch):
    """Ctrl-C while b.png's layers are written: a.png's are kept with a sidecar, none of b.png's is left (its
    files come together or not at all), and the message says how to finish. The same command refuses (and names
    --skip-existing); with --skip-existing it decomposes b and c only and leaves a's files as they were."""
    src = images(tmp_path / "in", "a.png", "b.png", "c.png")
    out = tmp_path / "out"
    argv = ["--input", src, "--output", out, "--task", "xray"]
    real, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 4:  # b.png's foreground, after its background
            raise KeyboardInterrupt
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    rc, err = run_main(decompose.main, argv)
    monkeypatch.setattr(Image.Image, "save", real)
    assert rc == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: 1 decomposition(s)") and "rerun the same command with --skip-existing" in last
    assert "Traceback" not in err
    (first,) = sidecars(out)
    assert first["interrupted"] and [r["input"] for r in first["images"]] == [str(src / "a.png")]
    done = sorted(f for f in os.listdir(out) if not f.startswith(decompose.SIDECAR_PREFIX))
    assert done == ["a_background.png", "a_foreground.png"]  # no b file, no temporary file, no lock file
    kept = {f: (os.stat(out / f).st_ino, (out / f).read_bytes()) for f in done}

    rc, err = run_main(decompose.main, argv)  # the same command again: refused, and told how to go on
    assert rc == 2 and len(errors(err)) == 1 and "--skip-existing" in errors(err)[0], err

    rc, err = run_main(decompose.main, argv + ["--skip-existing"])
    assert rc == 0, err
    assert "1 input(s) already done" in err and "a.png (16x16)" not in err and "b.png (16x16)" in err
    assert sorted(f for f in os.listdir(out) if not f.startswith(decompose.SIDECAR_PREFIX)) == [
        f"{s}_{k}.png" for s in "abc" for k in ("background", "foreground")]
    assert {f: (os.stat(out / f).st_ino, (out / f).read_bytes()) for f in done} == kept  # a's files untouched
    second = [r for r in sidecars(out) if not r["interrupted"]]
    assert len(second) == 1 and second[0]["already_done"] == [str(src / "a.png")]
    assert [r["input"] for r in second[0]["images"]] == [str(src / "b.png"), str(src / "c.png")]

    rc, err = run_main(decompose.main, argv + ["--skip-existing"])  # all done: nothing to do, nothing written
    assert rc == 0 and "nothing to do" in err and len(sidecars(out)) == 2


def test_skip_existing_refuses_an_input_with_only_some_outputs(fake, tmp_path):
    src = images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_s0_background.png").write_bytes(b"mine")
    argv = ["--input", src, "--output", out, "--task", "xray", "--num-samples", 2, "--skip-existing"]
    rc, err = run_main(decompose.main, argv)
    assert rc == 2 and len(errors(err)) == 1 and "a_s0_background.png exists but not every output" in err, err
    assert "--overwrite" in errors(err)[0] and os.listdir(out) == ["a_s0_background.png"]
    rc, err = run_main(decompose.main, argv + ["--overwrite"])  # redone, every sample
    assert rc == 0, err
    assert sorted(os.listdir(out))[:4] == [f"a_s{k}_{n}.png" for k in (0, 1) for n in ("background", "foreground")]
    assert (out / "a_s0_background.png").read_bytes() != b"mine"
