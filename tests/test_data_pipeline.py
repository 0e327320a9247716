"""The Grain pipeline: targets, determinism, resume in a new process, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dd_jax.data import blend, build, pipeline

H, W = 32, 48
TASKS = ("xray", "watermark", "flare")
SIZES = {"xray": 9, "watermark": 7, "flare": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    for t in TASKS:
        assert build.main(["--task", t, "--out", str(out), "--train", str(SIZES[t]), "--test", "2",
                           "--height", str(H), "--width", str(W), "--seed", "4"]) == 0
    return str(out)


def make(data_dir, **kw):
    args = dict(tasks=list(TASKS), height=32, width=48, batch_size=4, seed=0, shard_index=0, shard_count=1)
    args.update(kw)
    return pipeline.make_pipeline(data_dir, **args)


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contents(data_dir):
    (b,) = take(make(data_dir, include_rgba=True), 1)
    assert b["composite"].shape == (4, 32, 48, 3) and b["composite"].dtype == np.float32
    assert b["background"].shape == (4, 32, 48, 3) and b["foreground"].shape == (4, 32, 48, 3)
    assert b["foreground_rgba"].shape == (4, 32, 48, 4)
    for k in ("composite", "background", "foreground", "foreground_rgba"):
        assert b[k].min() >= -1.0 and b[k].max() <= 1.0
    assert b["task"].dtype == np.int32 and b["key"].dtype == np.int64
    assert all(c.startswith("Three sub-images.") for c in b["caption"])
    for i in range(4):
        name = b["task_name"][i]
        assert name == blend.TASKS[b["task"][i]] and b["dataset"][i] == f"alphablend/{name}"
        rgba = pipeline.to_unit(b["foreground_rgba"][i])
        # the target is the task's foreground-alone rendering of the stored layer ...
        np.testing.assert_allclose(pipeline.to_unit(b["foreground"][i]),
                                   blend.foreground_alone(name, rgba), atol=1e-5)
        # ... and with the background it recomposes to the composite (at the stored size)
        alpha = rgba[..., 3:] if name in blend.RECOMPOSE_NEEDS_ALPHA else None
        re_c = blend.recompose(name, pipeline.to_unit(b["foreground"][i]),
                               pipeline.to_unit(b["background"][i]), alpha)
        assert np.abs(re_c - pipeline.to_unit(b["composite"][i])).max() <= 2.5 / 255


@pytest.mark.parametrize("hw", [(16, 32), (64, 64), (48, 16)])
def test_resize_and_crop(data_dir, hw):
    (b,) = take(make(data_dir, height=hw[0], width=hw[1], batch_size=2), 1)
    assert b["composite"].shape == (2,) + hw + (3,) and b["foreground"].shape == (2,) + hw + (3,)
    with pytest.raises(ValueError):
        make(data_dir, height=30, width=48)


def test_same_seed_same_batches(data_dir):
    a, b = take(make(data_dir, seed=5), 4), take(make(data_dir, seed=5), 4)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    c = take(make(data_dir, seed=6), 4)
    assert any(not np.array_equal(x["key"], y["key"]) for x, y in zip(a, c))


def test_epochs_cover_each_record_once_per_epoch(data_dir):
    total = sum(SIZES.values())
    keys = np.concatenate([b["key"] for b in make(data_dir, num_epochs=2, batch_size=5)])
    assert len(keys) == 2 * total
    first, second = keys[:total], keys[total:]
    assert sorted(first) == list(range(total)) and sorted(second) == list(range(total))
    assert not np.array_equal(first, second)  # reshuffled per epoch


def test_sharding_is_disjoint_and_covering(data_dir):
    total = sum(SIZES.values())
    for shuffle in (False, True):
        shards = [np.concatenate([b["key"] for b in make(
            data_dir, num_epochs=1, shuffle=shuffle, batch_size=3, shard_index=i, shard_count=3)])
            for i in range(3)]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not set(shards[i]) & set(shards[j])
        assert sorted(np.concatenate(shards)) == list(range(total))


def test_weighted_mixture(data_dir):
    batches = take(make(data_dir, weights=[0.6, 0.3, 0.1], batch_size=8), 4)
    tasks = np.concatenate([b["task"] for b in batches])
    assert set(tasks) <= {blend.TASK_INDEX[t] for t in TASKS} and len(set(tasks)) >= 2
    for b in batches:
        for name, ds in zip(b["task_name"], b["dataset"]):
            assert ds == f"alphablend/{name}"
    again = take(make(data_dir, weights=[0.6, 0.3, 0.1], batch_size=8), 4)
    for x, y in zip(batches, again):
        assert_batches_equal(x, y)


def test_weighted_mixture_keys_name_their_records(data_dir):
    """A weighted example's `key` is its record's index in the size-proportional mixture, in every shard."""
    by_key = {}
    for b in make(data_dir, num_epochs=1, shuffle=False, random_crop=False, batch_size=7):
        for i, k in enumerate(b["key"]):
            by_key[int(k)] = (b["dataset"][i], b["composite"][i])
    assert sorted(by_key) == list(range(sum(SIZES.values())))
    seen = set()
    for shard in (0, 1):
        for b in take(make(data_dir, weights=[0.4, 0.3, 0.3], batch_size=8, random_crop=False,
                           shard_index=shard, shard_count=2), 2):
            for i, k in enumerate(b["key"]):
                name, composite = by_key[int(k)]
                assert b["dataset"][i] == name
                np.testing.assert_array_equal(b["composite"][i], composite, err_msg=f"key {k}")
                seen.add(int(k))
    assert len(seen) >= 8


def test_all_tasks_and_test_split(data_dir):
    ds = pipeline.make_pipeline(data_dir, "all", split="test", height=32, width=48, batch_size=2,
                                shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    keys = np.concatenate([b["key"] for b in ds])
    assert sorted(keys) == list(range(2 * len(TASKS)))


RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from dd_jax.data import pipeline
    data_dir, state, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
    ds = pipeline.make_pipeline(data_dir, ["xray", "watermark", "flare"], height=32, width=48,
                                batch_size=4, seed=3, shard_index=0, shard_count=1)
    it = iter(ds)
    it.set_state(state)
    b = next(it)
    np.savez(out, **{k: v for k, v in b.items()})
""")


def test_resume_in_a_new_process(data_dir, tmp_path):
    ds = make(data_dir, seed=3)
    it = iter(ds)
    for _ in range(5):  # past the first epoch boundary (21 records, batches of 4)
        next(it)
    state = it.get_state()
    expected = next(it)
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "resume.py").write_text(RESUME)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(tmp_path / "resume.py"), data_dir, str(tmp_path / "state.json"),
                    str(tmp_path / "b.npz")], check=True, env=env, timeout=300)
    got = dict(np.load(tmp_path / "b.npz"))
    assert_batches_equal(expected, got)


def test_worker_processes_resume(data_dir):
    ds = make(data_dir, seed=2, worker_count=2)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    it2 = iter(make(data_dir, seed=2, worker_count=2))
    for x in first:  # a fresh run with workers repeats itself ...
        assert_batches_equal(x, next(it2))
    next(it2)
    it2.set_state(state)  # ... and jumps back to a saved state
    for e in expected:
        assert_batches_equal(e, next(it2))
