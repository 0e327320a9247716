"""The real-model path on a tiny random diffusers Flux pipeline folder, the code a user with real weights runs:
convert the whole folder in one command, encode the captions once (text cache), train a LoRA for a few steps
on cached embeddings, decompose with the run, export its LoRA."""

from __future__ import annotations

import json
import os
import shutil

import encoders_reference as er
import numpy as np
import pytest
import train_helpers as th
from PIL import Image
from tolerance import assert_close

from configs import flux as flux_config
from dd_jax import decompose, system as system_lib, train
from dd_jax.data import blend, encode_text, pipeline, text_cache
from dd_jax.models import t5, tokenizers
from weights_conversion import convert, lora_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    er.make_tiny_pipeline(str(root / "pipe"))
    # the whole pipeline folder (transformer, VAE, T5, CLIP, tokenizers) in one command
    assert convert.main(["--source", str(root / "pipe"), "--output", str(root / "weights"), "--quiet"]) == 0
    data = th.make_dataset(root / "data", tasks=("xray",), train=6, test=2)
    return root, str(root / "weights"), data


def _config(weights, data, workdir_steps=3):
    c = flux_config.get_config("dev")
    c.model.weights = weights
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.data.dir, c.data.tasks = data, "xray"
    c.data.height = c.data.width = th.SIZE
    c.data.batch_size = 2
    c.train.steps = workdir_steps
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-2
    c.train.log_every = 1
    c.train.checkpoint_every = workdir_steps
    c.train.preview_every = 0
    c.sample.steps = 2
    return c


def test_cache_train_decompose_export(world, tmp_path):
    root, weights, data = world
    # 1. encode every caption once (+ the tasks' decomposition prompts)
    assert encode_text.main(["--data", data, "--encoders", weights]) == 0
    cache = text_cache.TextCache(text_cache.default_cache_dir(data))
    captions = encode_text.dataset_captions(data, "xray")
    assert len(captions) == 8 and set(captions) <= set(cache.rows)
    assert len(cache) == len(set(captions)) + len(blend.TASKS)  # deduplicated
    assert cache.txt_shape == (er.T5_MAX_LENGTH, er.T5["d_model"]) and cache.vec_shape == (er.CLIP["hidden_size"],)
    ids, _ = tokenizers.load_t5_tokenizer(weights)([captions[0]])
    # the cache and a second T5 run: same weights, float32, summed in whatever order XLA:CPU's threads give
    assert_close(cache[captions[0]][0], np.asarray(t5.load(os.path.join(weights, "t5"))(ids))[0], 1e-4, "T5 row")

    # 2. the input pipeline attaches the cached rows by caption; online encoding gives the same
    batch = next(iter(pipeline.make_pipeline(data, "xray", "train", th.SIZE, th.SIZE, 2, shuffle=False)))
    assert batch["txt"].shape == (2, er.T5_MAX_LENGTH, er.T5["d_model"]) and batch["vec"].shape == (2, 32)
    np.testing.assert_array_equal(batch["txt"][1], cache[batch["caption"][1]][0])
    online = next(iter(pipeline.make_pipeline(data, "xray", "train", th.SIZE, th.SIZE, 2, shuffle=False,
                                              text_encoders=weights)))
    assert_close(online["txt"], batch["txt"], 1e-4, "online T5")
    assert_close(online["vec"], batch["vec"], 1e-4, "online CLIP")

    # 3. LoRA training of the converted transformer on cached embeddings (no T5 in the step)
    run = tmp_path / "run"
    summary = train.train(_config(weights, data), str(run))
    assert summary["step"] == 3 and "export" in summary
    losses = th.losses(str(run))
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    flat, config = lora_export.read_run(str(run))
    assert config["model"]["weights"] == weights
    assert all(k.startswith("transformer.") and k.endswith((".lora_a", ".lora_b")) for k in flat)
    assert any(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("lora_b"))  # trained away from B = 0

    # 4. decomposition with the run: the task prompt comes from the cache
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), np.uint8)).save(src / "xray_a.png")
    out = tmp_path / "out"
    assert decompose.main(["--checkpoint", str(run), "--input", str(src), "--output", str(out),
                           "--batch-size", "1", "--steps", "2"]) == 0
    layers, sidecars = sorted(f for f in os.listdir(out) if f.endswith(".png")), \
        [f for f in os.listdir(out) if f.endswith(".json")]
    assert layers == ["xray_a_background.png", "xray_a_foreground.png"] and len(sidecars) == 1
    bg = np.asarray(Image.open(out / "xray_a_background.png"))
    assert bg.shape == (40, 24, 3) and bg.std() > 0

    # 5. the LoRA as a diffusers file, from the export and from the newest checkpoint alike
    a = lora_export.export_run(str(run), str(tmp_path / "a.safetensors"))
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("export"))
    b = lora_export.export_run(str(bare), str(tmp_path / "b.safetensors"))
    assert a["modules"] == b["modules"] == 2 * 8 + 2 * 2  # qkv x2, proj x2, mlp x4 per double; linear1/2 per single
    from safetensors.numpy import load_file

    ta, tb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


def test_prompts_and_errors(world, tmp_path):
    root, weights, data = world
    c = _config(weights, data)
    cache = text_cache.TextCache(text_cache.default_cache_dir(data)) if os.path.isdir(
        text_cache.default_cache_dir(data)) else None
    # a prompt the cache lacks is encoded with the converted encoders (model.weights) ...
    prompts = text_cache.PromptConditioning.from_config(c)
    txt, vec = prompts(["a prompt nobody cached", blend.task_prompt("cell")])
    assert txt.shape == (2, er.T5_MAX_LENGTH, er.T5["d_model"]) and vec.shape == (2, er.CLIP["hidden_size"])
    if cache is not None:  # (the cache is written by the test above)
        assert_close(txt[1], cache[blend.task_prompt("cell")][0], 1e-4, "prompt T5")
    # ... and without encoders it is a clear error
    c.model.weights = ""
    c.data.dir = str(tmp_path)
    with pytest.raises(ValueError, match="no text embedding for prompt"):
        text_cache.PromptConditioning.from_config(c)([blend.task_prompt("xray")])
    with pytest.raises(FileNotFoundError, match="no converted text encoder"):
        text_cache.TextEncoder(str(root / "pipe"))
    with pytest.raises(FileNotFoundError, match="not a text-embedding cache"):
        pipeline.make_pipeline(data, "xray", "train", th.SIZE, th.SIZE, 2, text_cache=str(tmp_path))
    c.model.weights = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.weights"):
        system_lib.build(c)
    # a caption missing from the cache stops the pipeline with the fix in the message
    cache_dir = tmp_path / "cache"
    text_cache.write_cache(str(cache_dir), ["only this caption"], text_cache.TextEncoder(weights), progress=False)
    with open(cache_dir / "index.json") as f:
        assert json.load(f)["captions"] == ["only this caption"]
    bf16 = text_cache.write_cache(str(tmp_path / "bf16"), ["only this caption"], text_cache.TextEncoder(weights),
                                  dtype="bfloat16", progress=False)
    full, half = text_cache.TextCache(str(cache_dir)), text_cache.TextCache(bf16)
    for x, y in zip(full["only this caption"], half["only this caption"]):
        assert y.dtype == np.float32 and not np.array_equal(x, y)
        np.testing.assert_allclose(y, x, rtol=1e-2, atol=1e-2)
    assert encode_text.main(["--data", data, "--encoders", str(tmp_path)]) == 2  # no t5/, clip/ there
    ds = pipeline.make_pipeline(data, "xray", "train", th.SIZE, th.SIZE, 2, text_cache=str(cache_dir))
    with pytest.raises(Exception, match="caption not in the text cache"):
        next(iter(ds))
