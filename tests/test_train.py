"""The training program: SIGTERM saves, NaN stops, export and reload (SIGKILL and other faults:
tests/test_faults.py)."""

from __future__ import annotations

import math
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from dd_jax import checkpoints, system as system_lib, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return th.make_dataset(tmp_path_factory.mktemp("data"))


def test_sigterm_saves_and_the_run_continues(data_dir, tmp_path, monkeypatch):
    c = th.small_config(data_dir, steps=10)
    calls = []
    real = train.device_batch

    def batch_then_sigterm(b, *args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(b, *args)

    monkeypatch.setattr(train, "device_batch", batch_then_sigterm)
    summary = train.train(c, str(tmp_path))
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 3
    assert checkpoints.Checkpoints(str(tmp_path / "checkpoints"), 3).latest() == 3
    assert "export" not in summary
    monkeypatch.setattr(train, "device_batch", real)
    summary = train.train(c, str(tmp_path))
    assert summary["start_step"] == 3 and summary["step"] == 10 and "export" in summary


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    c = th.small_config(data_dir, steps=20, checkpoint_every=4, log_every=5)
    calls = []
    real = train.device_batch

    def poisoned(b, *args):
        calls.append(1)
        out = real(b, *args)
        if len(calls) == 6:
            out["composite"] = out["composite"] * jnp.nan
        return out

    monkeypatch.setattr(train, "device_batch", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="step 6"):
        train.train(c, str(tmp_path))
    assert checkpoints.Checkpoints(str(tmp_path / "checkpoints"), 3).latest() == 4
    logged = th.losses(str(tmp_path))
    assert math.isnan(logged[6]) and all(math.isfinite(logged[s]) for s in range(1, 6))


def test_non_finite_gradient_norm_stops_before_its_checkpoint(data_dir, tmp_path, monkeypatch):
    """A finite loss with an inf gradient norm has already written NaN parameters: that step's checkpoint
    must not be saved (the last good one stays the newest)."""
    c = th.small_config(data_dir, steps=20, checkpoint_every=4, log_every=5)
    real = train.make_step

    def make_step(system, jit=True):
        step, calls = real(system, jit), []

        def poisoned(*args):
            calls.append(1)
            loss, gnorm = step(*args)
            return (loss, gnorm * jnp.inf) if len(calls) == 8 else (loss, gnorm)

        return poisoned

    monkeypatch.setattr(train, "make_step", make_step)
    with pytest.raises(train.NonFiniteLoss, match="gradient norm is inf at step 8"):
        train.train(c, str(tmp_path))
    assert checkpoints.Checkpoints(str(tmp_path / "checkpoints"), 3).latest() == 4


@pytest.mark.parametrize("field,old,new,refused", [
    ("clip_norm", None, 1.0, True), ("clip_norm", 1.0, 0.5, False),
    ("warmup_steps", 2, 0, True), ("warmup_steps", 2, 10, False), ("learning_rate", 3e-3, 1e-4, False)])
def test_rerun_may_not_change_the_optimizer_state_layout(data_dir, tmp_path, field, old, new, refused):
    """Switching clipping or the schedule on or off changes the optimizer state's tree: no checkpoint of the
    run could restore, so the rerun is refused before anything is touched; their values may change."""
    c = th.small_config(data_dir, **{field: old})
    checkpoints.record_config(str(tmp_path), c, 0)
    c2 = th.small_config(data_dir, **{field: new})
    if refused:
        with pytest.raises(checkpoints.RunError, match="layout of the optimizer state"):
            checkpoints.check_rerun(str(tmp_path), c2)
    else:
        checkpoints.check_rerun(str(tmp_path), c2)


def test_init_from_is_checked_before_the_run_is_made(data_dir, tmp_path):
    """A folder that is not a model, or a model of another architecture: one-line RunError, no workdir."""
    not_model = tmp_path / "photos"
    not_model.mkdir()
    c = th.small_config(data_dir, steps=2, init_from=str(not_model))
    with pytest.raises(checkpoints.RunError, match="not a trained model folder"):
        train.train(c, str(tmp_path / "run"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = th.small_config(data_dir, steps=2, init_from=os.path.join(repo, "dd_jax", "assets", "tiny"))
    with pytest.raises(checkpoints.RunError, match="another architecture"):
        train.train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_export_reloads_the_trained_model(data_dir, tmp_path):
    c = th.small_config(data_dir, steps=4)
    summary = train.train(c, str(tmp_path))
    exported = checkpoints.load_trained(summary["export"])
    os.rename(summary["export"], str(tmp_path / "moved"))
    from_checkpoint = checkpoints.load_trained(str(tmp_path))  # a workdir without export: its newest checkpoint
    a = from_checkpoint.model.transformer.img_in.kernel[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(exported.model.transformer.img_in.kernel[...]))
    np.testing.assert_array_equal(np.asarray(from_checkpoint.model.conditioner.tokens[...]),
                                  np.asarray(exported.model.conditioner.tokens[...]))
    fresh = system_lib.build(c)
    assert not np.array_equal(np.asarray(a), np.asarray(fresh.model.transformer.img_in.kernel[...]))
    # a new run started from it (train.init_from: parameters only) begins exactly there
    c0 = th.small_config(data_dir, steps=1, learning_rate=0.0)  # one step that changes nothing
    c0.train.init_from = str(tmp_path / "moved")
    started = checkpoints.load_trained(train.train(c0, str(tmp_path / "warm"))["export"])
    np.testing.assert_array_equal(np.asarray(started.model.transformer.img_in.kernel[...]), np.asarray(a))
    c0.model.params.vec_in_dim = 2 * c0.model.params.vec_in_dim
    with pytest.raises(checkpoints.RunError, match="another architecture.*vec_in_dim"):
        train.train(c0, str(tmp_path / "wrong"))


def test_batch_must_split_over_shards_processes_and_mesh(data_dir):
    from types import SimpleNamespace

    c = th.small_config(data_dir)  # global batch 4, one process
    mesh = lambda data, fsdp: SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": 1})
    train.check_batch(c, mesh(2, 2))
    with pytest.raises(ValueError, match=r"data x fsdp = 1 x 8 = 8 devices"):
        train.check_batch(c, mesh(1, 8))
    c.data.shards = 3
    with pytest.raises(ValueError, match="not divisible by the 3 data shards"):
        train.check_batch(c, mesh(1, 1))


def test_data_state_carries_the_shard_count_and_reads_old_checkpoints(data_dir):
    c = th.small_config(data_dir)
    c.data.shards = 2  # one process reading both shards: batches of 2 + 2
    data = train.ProcessData(c)
    assert data.indices == [0, 1] and next(data)["composite"].shape[0] == 4
    state = data.get_state()
    assert state["shards"] == 2
    again = train.ProcessData(c)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["key"], next(data)["key"])
    old, ref = train.ProcessData(c), train.ProcessData(c)
    old.set_state(state["iterator"])  # a checkpoint from before data.shards: the bare Grain state
    ref.set_state(state)
    np.testing.assert_array_equal(next(old)["key"], next(ref)["key"])
    c.data.shards = 0
    with pytest.raises(ValueError, match="--config.data.shards=2"):
        train.ProcessData(c).set_state(state)


def test_text_source_cache_or_online_encoders():
    from configs import base

    c = base.get_config()
    assert train.text_source(c) == ("auto", None)  # data.dir/text_cache
    c.text.cache = "/caches/ab"
    assert train.text_source(c) == ("/caches/ab", None)
    c.text.online = True
    with pytest.raises(ValueError, match="text.online needs"):
        train.text_source(c)
    c.model.weights = "/models/flux-dev-jax"
    assert train.text_source(c) == (None, "/models/flux-dev-jax")
    c.text.encoders = "/models/encoders"
    assert train.text_source(c) == (None, "/models/encoders")
    c.text.kind = "task"  # learned task conditioning: no text at all
    assert train.text_source(c) == (None, None)


def test_processes_agree_on_stopping_at_the_same_steps():
    """With several processes the stop flags are exchanged only at multiples of train.sync_every (the same steps
    on every process, so they stop together); a single process checks its signal flag after every step."""
    steps = range(1, 31)
    assert [s for s in steps if train.agrees_on_stop_at(s, 10, process_count=4)] == [10, 20, 30]
    assert all(train.agrees_on_stop_at(s, 10, process_count=1) for s in steps)
    assert all(train.agrees_on_stop_at(s, 1, process_count=4) for s in steps)
    # a signal that reaches one process after step 13 and another after step 17: both stop at step 20
    first_stop = {p: next(s for s in steps if s >= got and train.agrees_on_stop_at(s, 10, process_count=2))
                  for p, got in ((0, 13), (1, 17))}
    assert first_stop == {0: 20, 1: 20}


def test_gpu_memory_fraction_is_exported_unless_the_environment_sets_it(monkeypatch):
    from configs import gpu_h100

    c = gpu_h100.get_config()
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert train.set_gpu_memory_fraction(c) == "0.9"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert train.set_gpu_memory_fraction(c) == "0.5"
