"""Run directories under faults (issue 15): SIGKILL at seeded points of training (between steps, while a
checkpoint is written, just before it is committed), a corrupt newest checkpoint, a full disk (an injected
OSError ENOSPC) during a checkpoint save and an export; and the run-directory defects: a rerun with another
architecture or a config that does not build, unknown config fields, missing data, train.steps=0, bad model
metadata, stale exports.

One uninterrupted reference run (12 steps, checkpoints 4, 8, 12) is trained once; every fault works on a
copy of it or resumes towards it, and the losses logged after the restored checkpoint must equal the
reference's exactly. The persistent compilation cache (a temporary folder, this module only) lets the
killed children and the in-process resumes reuse one compiled step. FIGURES collects the counts (kills
tried, resumes identical, bytes lost) and is printed at the end (`pytest -s`)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_helpers as th
from flax import nnx

from dd_jax import checkpoints, decompose, flow, system as system_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
FIGURES = {"kills": 0, "resumes_identical": 0, "resumed_steps_compared": 0, "bytes_lost": 0, "disk_full": 0}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from jax._src import compilation_cache

    d = str(tmp_path_factory.mktemp("xla_cache"))
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", d)
    compilation_cache.reset_cache()
    yield d
    jax.config.update("jax_compilation_cache_dir", old)
    compilation_cache.reset_cache()
    print(f"\nfault injection: {json.dumps(FIGURES)}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return th.make_dataset(tmp_path_factory.mktemp("data"), train=12, test=0)


def _config(data_dir, **kw):
    return th.small_config(data_dir, steps=STEPS, checkpoint_every=EVERY, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data_dir, cache_dir):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    train.train(_config(data_dir), run)
    assert sorted(th.losses(run)) == list(range(1, STEPS + 1))
    return run


def _copy(ref, tmp_path) -> str:
    dest = str(tmp_path / "run")
    shutil.copytree(ref, dest)
    return dest


def _snapshot(run: str) -> dict[str, tuple[int, str]]:
    """{path: (size, sha1)} of what a run must keep: committed checkpoints, configs by step, the export,
    metrics.jsonl (only ever appended to)."""
    out = {}
    for root, _, files in os.walk(run):
        rel = os.path.relpath(root, run)
        top = rel.split(os.sep)[0]
        keep = (top == "checkpoints" and rel != "checkpoints" and rel.split(os.sep)[1].isdigit()) \
            or top in ("export", "skipped_checkpoints") or rel == "."
        for f in files:
            if rel == "." and not (f == "metrics.jsonl" or (f.startswith("config.") and f != "config.json")):
                continue
            if keep:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, run)] = (os.path.getsize(p), hashlib.sha1(fh.read()).hexdigest())
    return out


def _bytes_lost(run: str, before: dict, allow_gone=()) -> int:
    """Bytes of `before` that are gone or changed (metrics.jsonl: unless the old content is a prefix)."""
    lost = 0
    for rel, (size, digest) in before.items():
        p = os.path.join(run, rel)
        if rel.startswith(tuple(allow_gone)):
            continue
        if not os.path.isfile(p):
            lost += size
            continue
        with open(p, "rb") as fh:
            data = fh.read()
        if rel == "metrics.jsonl":
            if hashlib.sha1(data[:size]).hexdigest() != digest:
                lost += size
        elif hashlib.sha1(data).hexdigest() != digest:
            lost += size
    return lost


def _assert_resumed_like_ref(run, ref, start):
    got, want = th.losses(run), th.losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    after = [s for s in range(start + 1, STEPS + 1)]
    same = [s for s in after if got[s] == want[s]]
    FIGURES["resumed_steps_compared"] += len(after)
    assert same == after, {s: (got[s], want[s]) for s in after if s not in same}
    return len(same)


def _partial_files(run):
    return [os.path.join(r, f) for r, ds, fs in os.walk(run) for f in ds + fs
            if "orbax-checkpoint-tmp" in f or ".partial-" in f or ".tmp-" in f]


# ------------------------------------------------------------------ SIGKILL, then resume
KILLS = [("step", 0), ("save", 1), ("commit", 2)]  # (kind, seed): where it is killed is drawn from the seed


@pytest.mark.matrix
@pytest.mark.parametrize("kind,seed", KILLS)
def test_sigkill_then_resume_logs_the_reference_losses(kind, seed, ref, data_dir, cache_dir, tmp_path):
    rng = np.random.default_rng(seed)
    n = {"step": int(rng.integers(2, STEPS)), "save": int(rng.integers(1, 3)), "commit": int(rng.integers(1, 4))}[kind]
    delay = float(rng.uniform(0.0, 0.02))
    run = str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # the test process's precision (conftest): the same program
    c = _config(data_dir)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fault_child.py"), kind, str(n), str(delay),
                           "--", f"--workdir={run}"] + th.config_args(c), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, (kind, n, proc.returncode, proc.stderr[-3000:])
    FIGURES["kills"] += 1
    committed = checkpoints.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).steps()
    if kind == "commit":
        assert committed[:1] == ([EVERY * (n - 1)] if n > 1 else []), committed
    before = _snapshot(run)
    summary = train.train(c, run)
    start = summary["start_step"]
    assert start == (committed[0] if committed else 0)
    _assert_resumed_like_ref(run, ref, start)
    FIGURES["resumes_identical"] += 1
    lost = _bytes_lost(run, before)
    FIGURES["bytes_lost"] += lost
    assert lost == 0
    assert not _partial_files(run), _partial_files(run)
    assert os.path.isfile(os.path.join(run, f"config.{start}.json"))


# ------------------------------------------------------------------ corrupt newest checkpoint
def _truncate_largest(ckpt_dir: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(ckpt_dir) for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(ref, data_dir, tmp_path, capfd):
    """Defect 4: resume skips the newest checkpoint that does not restore (one line), sets it aside and
    resumes from the one before with the reference's losses; the rerun's config is kept as config.8.json."""
    run = _copy(ref, tmp_path)
    with open(os.path.join(ref, "metrics.jsonl")) as f:  # the log up to step 8: the resumed steps must be logged
        logged_before = [line for line in f if json.loads(line)["step"] <= 8]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(logged_before)
    victim = _truncate_largest(os.path.join(run, "checkpoints", str(STEPS)))
    size = os.path.getsize(victim)
    before = _snapshot(run)
    c = _config(data_dir, keep_checkpoints=5)  # a rerun may change how it trains
    capfd.readouterr()
    summary = train.train(c, run)
    err = capfd.readouterr().err
    assert summary["start_step"] == 8 and summary["step"] == STEPS and "export" in summary
    skips = [line for line in err.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skips) == 1 and f"checkpoints/{STEPS}" in skips[0] and "Traceback" not in err
    moved = os.path.join(run, "skipped_checkpoints", str(STEPS))
    assert os.path.isdir(moved) and os.path.getsize(os.path.join(moved, os.path.relpath(
        victim, os.path.join(run, "checkpoints", str(STEPS))))) == size  # kept as it was
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = f.readlines()
    assert lines[:len(logged_before)] == logged_before  # appended to, not rewritten
    assert sorted({json.loads(line)["step"] for line in lines[len(logged_before):]}) == list(range(9, STEPS + 1))
    _assert_resumed_like_ref(run, ref, 8)
    lost = _bytes_lost(run, before, allow_gone=(f"checkpoints{os.sep}{STEPS}", "export"))  # moved / re-exported
    FIGURES["bytes_lost"] += lost
    assert lost == 0
    assert checkpoints.load_config(os.path.join(run, "config.8.json")).train.keep_checkpoints == 5
    assert checkpoints.load_config(os.path.join(run, "config.0.json")).train.keep_checkpoints == 3
    assert checkpoints.load_config(os.path.join(run, "config.json")).train.keep_checkpoints == 5


def _params(system) -> dict:
    state = nnx.state(system.model, system.trainable())
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_decompose_skips_a_corrupt_checkpoint_and_loads_the_newest_weights(ref, tmp_path, capfd):
    """Defects 4 and 6 (decompose --checkpoint RUN): the newest trained weights are loaded, not an older
    export, a corrupt checkpoint is skipped with one line, and the weights loaded are named with their step."""
    run = _copy(ref, tmp_path)
    system = system_lib.build(checkpoints.load_config(os.path.join(run, "config.json")))
    ckpts = checkpoints.Checkpoints(os.path.join(run, "checkpoints"), read_only=True)

    def restored(step):
        state, _ = ckpts.restore(step, checkpoints.train_state(system, flow.system_optimizer(system)))
        nnx.update(system.model, state["params"])
        return _params(system)

    want = restored(STEPS)
    restored(8)
    ckpts.close()
    checkpoints.export(system, os.path.join(run, "export"), step=8)  # an export from before the run went on to 12

    lines = []
    newest = checkpoints.load_trained(run, log=lines.append)
    assert lines == [f"loading weights from {run}/checkpoints/12 (checkpoint, step 12)"], lines
    got = _params(newest)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    _truncate_largest(os.path.join(run, "checkpoints", "12"))
    lines = []
    checkpoints.load_trained(run, log=lines.append)
    assert len(lines) == 2 and lines[0].startswith(f"skipping {run}/checkpoints/12: it does not restore (")
    assert lines[1] == f"loading weights from {run}/export (export, step 8)", lines
    assert all("\n" not in line for line in lines)
    # the CLI says the same
    img = tmp_path / "xray_1.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(img)
    capfd.readouterr()
    assert decompose.main(["--input", str(img), "--output", str(tmp_path / "out"), "--checkpoint", run]) == 0
    err = capfd.readouterr().err
    assert f"loading weights from {run}/export (export, step 8)" in err and "skipping" in err


# ------------------------------------------------------------------ full disk
def test_disk_full_during_a_checkpoint_save(ref, data_dir, tmp_path, monkeypatch, capfd):
    """ENOSPC while a checkpoint is written: one clear error, its partial files removed, the checkpoint
    before it and the metrics kept; a rerun with space resumes and logs the reference's losses."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    run = _copy(ref, tmp_path)
    shutil.rmtree(os.path.join(run, "checkpoints", str(STEPS)))  # a run that stopped at step 8
    shutil.rmtree(os.path.join(run, "export"))
    before = _snapshot(run)

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", no_space)
    with pytest.raises(train.DiskFull) as e:
        train.train(_config(data_dir), run)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and f"step {STEPS}" in msg
    assert "the checkpoint of step 8" in msg
    FIGURES["disk_full"] += 1
    assert not _partial_files(run), _partial_files(run)
    assert checkpoints.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).steps() == [8, 4]
    lost = _bytes_lost(run, before)
    FIGURES["bytes_lost"] += lost
    assert lost == 0
    monkeypatch.undo()
    summary = train.train(_config(data_dir), run)
    assert summary["start_step"] == 8 and "export" in summary
    _assert_resumed_like_ref(run, ref, 8)


def test_disk_full_during_export_keeps_the_earlier_export(ref, data_dir, tmp_path, monkeypatch):
    from dd_jax.models import store

    run = _copy(ref, tmp_path)
    before = _snapshot(run)
    real = store.GroupedWriter.write_group
    calls = []

    def write_group(self, group, flat):
        calls.append(group)
        if len(calls) == 2:  # the first group is written: a partial folder exists
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, group, flat)

    monkeypatch.setattr(store.GroupedWriter, "write_group", write_group)
    with pytest.raises(train.DiskFull) as e:
        train.train(_config(data_dir), run)  # at step 12 already: only exports
    assert "\n" not in str(e.value) and "export" in str(e.value) and len(calls) == 2
    FIGURES["disk_full"] += 1
    assert not _partial_files(run) and not [f for f in os.listdir(run) if f.startswith(".export")]
    lost = _bytes_lost(run, before)
    FIGURES["bytes_lost"] += lost
    assert lost == 0


# ------------------------------------------------------------------ reruns and configs (defects 3, 8, 9)
def test_rerun_that_changes_the_architecture_is_refused_untouched(ref, data_dir, tmp_path):
    run = _copy(ref, tmp_path)
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if f.startswith("config")}
    listing = sorted(os.listdir(run))
    for field, value in (("hidden_size", 64), ("depth", 2)):  # 64: does not build either; 2: builds
        c = _config(data_dir)
        c.model.params[field] = value
        was = {"hidden_size": 32, "depth": 1}[field]
        with pytest.raises(checkpoints.RunError, match=rf"model\.params\.{field}: {was} -> {value}"):
            train.train(c, run)
    after = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run) if f.startswith("config")}
    assert after == before and sorted(os.listdir(run)) == listing
    # the run still loads
    checkpoints.load_trained(run, log=lambda s: None)


def test_config_that_does_not_build_is_refused_before_the_run_exists(data_dir, tmp_path):
    c = _config(data_dir)
    c.model.params.hidden_size = 64  # head dim 32, axes_dim sums to 16
    with pytest.raises(checkpoints.RunError, match="does not build"):
        train.train(c, str(tmp_path / "new"))
    assert not os.path.exists(tmp_path / "new")


def test_missing_or_empty_data_and_zero_steps_are_refused_before_the_run_exists(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_train = th.make_dataset(tmp_path / "no_train", tasks=("xray",), train=0, test=2)
    for d, match in ((tmp_path / "nowhere", "no such folder"), (empty, "holds no dataset"),
                     (no_train, "no train examples")):
        c = _config(str(d))
        c.data.tasks = "xray" if d == no_train else "all"
        with pytest.raises(checkpoints.RunError, match=match):
            train.train(c, str(tmp_path / "run"))
        assert not os.path.exists(tmp_path / "run")
    c = th.small_config(data_dir, steps=0)
    with pytest.raises(checkpoints.RunError, match="train.steps=0"):
        train.train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_cli_one_line_errors_exit_2(data_dir, tmp_path):
    """Unknown config field, missing data, train.steps=0: one line, exit status 2, no run directory."""
    c = _config(data_dir)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cases = [(["--config.model.nonexistent=1"], "--config.model.nonexistent"),
             ([f"--config.data.dir={tmp_path / 'nowhere'}"], "data.dir"),
             (["--config.train.steps=0"], "train.steps=0")]
    for extra, word in cases:
        r = subprocess.run([sys.executable, "-m", "dd_jax.train", f"--workdir={tmp_path / 'run'}"]
                           + th.config_args(c) + extra, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in r.stderr.splitlines()
                 if line.strip() and not line.startswith(("WARNING", "I0", "W0"))]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], r.stderr
        assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("meta", [b"\x8b\x07\xff random bytes \x00", b"{}", b'{"format": "dd_jax.grouped/1"}',
                                  b"[1, 2]"])
def test_bad_model_metadata_is_one_line(ref, tmp_path, capfd, meta):
    model = str(tmp_path / "model")
    shutil.copytree(os.path.join(ref, "export"), model)
    with open(os.path.join(model, "dd_jax_model.json"), "wb") as f:
        f.write(meta)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    capfd.readouterr()
    assert decompose.main(["--input", str(img), "--output", str(tmp_path / "out"), "--checkpoint", model]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "dd_jax_model.json" in err[0], err
