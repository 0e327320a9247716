"""Flux transformer port: parity with diffusers through our converter, BFL files, bf16, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import flux_reference as fr
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tolerance import rel_err

from dd_jax.models import flux
from weights_conversion import convert, flux as flux_maps
from weights_conversion.safetensors_reader import CheckpointError

pytestmark = pytest.mark.matrix  # also run on the Python 3.12 leg of .ci/run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def diffusers_guided(tmp_path_factory):
    model = fr.make_diffusers_flux(guidance=True, seed=0)
    path = tmp_path_factory.mktemp("hub") / "transformer"
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.slow  # covered by test_flux_position (a peaked fixture) and test_encoders_pipeline (the script)
def test_diffusers_parity_via_cli(diffusers_guided, tmp_path):
    model, path = diffusers_guided
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_flux.py"), "--source", path,
                        "--output", str(out), "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours_model = flux.load(str(out))
    assert ours_model.params.depth == 2 and ours_model.params.depth_single_blocks == 2
    x = fr.inputs(batch=2, h=3, w=5, guidance=True)
    ref = fr.diffusers_forward(model, x)
    ours = fr.jax_forward(ours_model, x)
    assert ours.shape == ref.shape == (2, 15, 16)
    assert rel_err(ours, ref) <= 1e-4


def test_guidance_free_sharded_pipeline_folder(tmp_path):
    """Guidance-free variant, saved in shards inside a pipeline folder."""
    model = fr.make_diffusers_flux(guidance=False, seed=3)
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / "transformer", max_shard_size="40KB")
    (pipe / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert any(f.endswith(".index.json") for f in os.listdir(pipe / "transformer"))
    out = flux_maps.convert_transformer(str(pipe), str(tmp_path / "out"), "float32", progress=False)
    ours_model = flux.load(out)
    assert ours_model.guidance_in is None
    x = fr.inputs(batch=2, h=4, w=2, guidance=False, seed=5)
    assert rel_err(fr.jax_forward(ours_model, x), fr.diffusers_forward(model, x)) <= 1e-4


@pytest.fixture(scope="module")
def bfl_checkpoint(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    params = flux.FluxParams(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=64,
                             mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6),
                             theta=10_000, qkv_bias=True, guidance_embed=True)
    state = fr.random_bfl_state(params, seed=7)
    reference = FluxTransformer2DModel(**{**fr.TINY, "num_single_layers": 3, "guidance_embeds": True}).eval()
    # strict: every BFL name must land on a diffusers parameter, and cover all of them
    reference.load_state_dict(fr.bfl_to_diffusers(dict(state), params.hidden_size), strict=True)
    path = tmp_path_factory.mktemp("bfl") / "flux1-tiny.safetensors"
    save_file(state, str(path))
    return reference, str(path), params


@pytest.mark.slow  # covered by test_flux_position.test_bfl_file_parity_sees_position (the same CLI, a peaked fixture)
def test_bfl_single_file_parity(bfl_checkpoint, tmp_path):
    reference, path, params = bfl_checkpoint
    assert convert.main(["--source", path, "--output", str(tmp_path / "o"), "--axes-dim", "4,6,6", "--quiet"]) == 0
    ours_model = flux.load(str(tmp_path / "o"))
    assert ours_model.params == params  # inferred from tensor shapes
    x = fr.inputs(batch=2, h=2, w=3, guidance=True, seed=11)
    assert rel_err(fr.jax_forward(ours_model, x), fr.diffusers_forward(reference, x)) <= 1e-4


def test_bfl_prefixed_bf16_file_keeps_dtype(bfl_checkpoint, tmp_path):
    """A ComfyUI-style prefixed bf16 file converts without a float32 detour."""
    _, path, params = bfl_checkpoint
    state = {"model.diffusion_model." + k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}
    src = tmp_path / "prefixed.safetensors"
    save_file(state, str(src))
    out = flux_maps.convert_transformer(str(src), str(tmp_path / "o"), None, axes_dim=(4, 6, 6), progress=False)
    m = flux.load(out)
    assert m.img_in.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(m.img_in.kernel[...]), state["model.diffusion_model.img_in.weight"].T)


def test_bfloat16_conversion_and_forward(diffusers_guided, tmp_path):
    model, path = diffusers_guided
    out = flux_maps.convert_transformer(path, str(tmp_path / "bf16"), "bfloat16", progress=False)
    m16 = flux.load(out)
    assert m16.double_blocks[0].img_attn.qkv.kernel[...].dtype == jnp.bfloat16
    x = fr.inputs(batch=2, h=3, w=5, guidance=True)
    ref = fr.diffusers_forward(model, x)
    ours = fr.jax_forward(m16, x)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel
    assert rel > 0  # bf16 actually in effect


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_fails_clearly_and_leaves_nothing(bfl_checkpoint, tmp_path, damage):
    _, path, _ = bfl_checkpoint
    state = load_file(path)
    key = "double_blocks.1.img_attn.proj.weight"
    if damage == "missing":
        del state[key]
        expect = [key, "(64, 64)"]
    elif damage == "unexpected":
        state["double_blocks.1.extra.weight"] = np.zeros((3, 2), np.float32)
        expect = ["double_blocks.1.extra.weight", "(3, 2)"]
    else:
        state[key] = np.zeros((64, 65), np.float32)
        expect = [key, "(64, 64)", "(64, 65)"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        flux_maps.convert_transformer(str(bad), str(out), "float32", axes_dim=(4, 6, 6), progress=False)
    msg = str(err.value)
    assert all(e in msg for e in expect), msg
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
    # the CLI reports it as one error line and a non-zero exit
    assert convert.main(["--source", str(bad), "--output", str(out), "--quiet", "--axes-dim", "4,6,6"]) == 2


def test_failure_while_streaming_leaves_nothing(bfl_checkpoint, tmp_path, monkeypatch):
    _, path, _ = bfl_checkpoint
    from weights_conversion.safetensors_reader import SafetensorsReader

    real_read, calls = SafetensorsReader.read, []

    def flaky(self, name, dtype=None):
        calls.append(name)
        if len(calls) > 20:
            raise OSError("disk went away")
        return real_read(self, name, dtype)

    monkeypatch.setattr(SafetensorsReader, "read", flaky)
    with pytest.raises(OSError):
        flux_maps.convert_transformer(path, str(tmp_path / "out"), "float32", axes_dim=(4, 6, 6), progress=False)
    assert os.listdir(tmp_path) == []


def test_truncated_file_is_rejected(bfl_checkpoint, tmp_path):
    _, path, _ = bfl_checkpoint
    data = open(path, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        flux_maps.convert_transformer(str(bad), str(tmp_path / "out"), progress=False)


def test_output_exists_needs_overwrite(diffusers_guided, tmp_path):
    _, path = diffusers_guided
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(FileExistsError):
        flux_maps.convert_transformer(path, str(out), progress=False)
    flux_maps.convert_transformer(path, str(out), overwrite=True, progress=False)
    assert flux.load(str(out)).params.hidden_size == 64
