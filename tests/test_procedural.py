"""Procedural data (dd_jax.data.procedural): records drawn by index, through the Grain pipeline, in training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dd_jax.data import backgrounds, blend, pipeline, procedural

SIZE = 32


def _pipe(**kw):
    args = dict(height=SIZE, width=SIZE, batch_size=4, seed=3, source="procedural", shard_index=0, shard_count=1,
                read_threads=1, prefetch_buffer_size=2)
    args.update(kw)
    return pipeline.make_pipeline("", kw.pop("tasks", "all"), **{k: v for k, v in args.items() if k != "tasks"})


def test_a_record_depends_on_seed_and_index_only():
    a = procedural.ProceduralSource(["watermark", "flare"], SIZE, SIZE, seed=5)
    b = pickle.loads(pickle.dumps(procedural.ProceduralSource(["watermark", "flare"], SIZE, SIZE, seed=5)))
    for i in (7, 0, 3):  # any order, any process
        ra, rb = a[i], b[i]
        assert ra["key"] == rb["key"] == i and ra["caption"] == rb["caption"]
        for k in ("composite", "background", "foreground"):
            np.testing.assert_array_equal(ra[k], rb[k])
    other = procedural.ProceduralSource(["watermark", "flare"], SIZE, SIZE, seed=6)[7]
    assert not np.array_equal(other["composite"], a[7]["composite"])
    test = procedural.ProceduralSource(["watermark", "flare"], SIZE, SIZE, seed=5, split="test")[7]
    assert not np.array_equal(test["composite"], a[7]["composite"])  # the test stream is another stream
    r = a[4]
    assert r["composite"].dtype == np.uint8 and r["composite"].shape == (SIZE, SIZE, 3)
    assert r["foreground"].shape == (SIZE, SIZE, 4) and blend.TASKS[r["task"]] == "watermark"
    # stored layers recompose to the stored composite (the synthesizer's data-integrity property)
    rec = blend.composite("watermark", r["foreground"] / 255.0, r["background"] / 255.0)
    assert np.abs(rec * 255.0 - r["composite"]).max() <= 0.5 + 1e-3


def test_tasks_round_robin_styles_in_turn_and_weights():
    s = procedural.ProceduralSource(list(blend.TASKS), SIZE, SIZE, style="classic+photo")
    assert [s.task_of(i) for i in range(12)] == list(blend.TASKS) * 2
    assert [s.style_of(i) for i in (0, 5, 6, 11, 12)] == ["classic", "classic", "photo", "photo", "classic"]
    w = procedural.ProceduralSource(["xray", "cell"], SIZE, SIZE, weights=[3, 1])
    share = np.mean([w.task_of(i) == "xray" for i in range(4000)])
    assert 0.72 < share < 0.78
    never = procedural.ProceduralSource(["xray", "cell"], SIZE, SIZE, weights=[1, 0])
    assert {never.task_of(i) for i in range(200)} == {"xray"}


@pytest.mark.parametrize("kw, match", [
    (dict(tasks=["xray", "fog"]), "unknown task"),
    (dict(tasks=[]), "unknown task"),
    (dict(tasks=["xray"], style="sketch"), "unknown style"),
    (dict(tasks=["xray"], split="holdout"), "unknown split"),
    (dict(tasks=["xray", "cell"], weights=[1]), "one non-negative number per task"),
    (dict(tasks=["xray", "cell"], weights=[0, 0]), "not all 0"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    tasks = kw.pop("tasks")
    with pytest.raises(ValueError, match=match):
        procedural.ProceduralSource(tasks, SIZE, SIZE, **kw)


def test_held_out_photos_are_never_drawn():
    s = procedural.ProceduralSource(["watermark"], SIZE, SIZE, style="classic+photo")
    for style in ("classic", "photo"):
        names = s.synthesizer("watermark", style).bg_source.names
        assert names and not set(names) & set(backgrounds.HELD_OUT_PHOTOS)


def test_pipeline_shards_are_disjoint_and_resume_exactly():
    keys = [np.concatenate([next(it)["key"] for _ in range(2)])
            for it in (iter(_pipe(shard_index=i, shard_count=2)) for i in range(2))]
    assert not set(keys[0]) & set(keys[1]) and sorted(np.concatenate(keys)) == list(range(16))
    it = iter(_pipe(tasks=["watermark", "xray"]))
    next(it)
    state = it.get_state()
    want = next(it)
    again = iter(_pipe(tasks=["watermark", "xray"]))
    again.set_state(state)
    got = next(again)
    np.testing.assert_array_equal(got["key"], want["key"])
    np.testing.assert_array_equal(got["composite"], want["composite"])
    assert got["composite"].shape == (4, SIZE, SIZE, 3)
    assert -1.0 <= got["composite"].min() <= got["composite"].max() <= 1.0
    assert list(got["task_name"]) == ["watermark", "xray"] * 2


def test_pipeline_refuses_epochs_and_unknown_sources():
    with pytest.raises(ValueError, match="endless"):
        _pipe(num_epochs=2)
    with pytest.raises(ValueError, match="data source 'web'"):
        _pipe(source="web")


def test_a_fixed_number_of_examples_repeats_reshuffled():
    it = iter(_pipe(tasks=["watermark"], examples=6, batch_size=3))
    epochs = [np.concatenate([next(it)["key"] for _ in range(2)]) for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)  # each epoch is the same 6 records
    assert len({tuple(e) for e in epochs}) > 1  # in a new order
    with pytest.raises(ValueError, match="examples=-1"):
        _pipe(examples=-1)
