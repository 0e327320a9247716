"""Flux autoencoder port: parity with diffusers' AutoencoderKL (diffusers folders and BFL files), bf16, errors."""

from __future__ import annotations

import os

import encoders_reference as er
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from tolerance import rel_err

from dd_jax.models import autoencoder
from weights_conversion import autoencoder as ae_maps, convert
from weights_conversion.safetensors_reader import CheckpointError

pytestmark = pytest.mark.matrix  # also run on the Python 3.12 leg of .ci/run

SCALE, SHIFT = 0.3611, 0.1159
# compiled once per shape: much faster on CPU than op-by-op dispatch
encode = nnx.jit(lambda model, images: model.encode(images))
decode = nnx.jit(lambda model, latents, chunk=None: model.decode(latents, batch_chunk=chunk), static_argnums=2)



def _torch_encode(vae, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
    return ((mean - SHIFT) * SCALE).permute(0, 2, 3, 1).numpy()


def _torch_decode(vae, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        z = torch.from_numpy(latents).permute(0, 3, 1, 2) / SCALE + SHIFT
        return vae.decode(z).sample.permute(0, 2, 3, 1).numpy()


BOUND = 2e-5  # error / reference scale; the true port is at 1e-6 to 3.4e-6 (docs/testing.md)
MISS = 10 * BOUND  # what a plausible wrong constant must show at least


def _wrong_eps(model):
    """The converted model with GroupNorm eps 1e-5 (torch's default) for the VAE's 1e-6."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, autoencoder.GroupNorm):
            m.eps = 1e-5
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    vae = er.make_vae(seed=0)
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "vae")
    out = ae_maps.convert_autoencoder(str(root / "vae"), str(root / "out"), progress=False)
    return vae, out


def test_diffusers_parity_encode_decode(converted):
    vae, out = converted
    ours = autoencoder.load(out)
    assert ours.params.block_out_channels == (8, 16, 16, 16) and ours.params.latent_channels == 16
    assert (ours.params.scaling_factor, ours.params.shift_factor) == (SCALE, SHIFT)
    images = er.vae_images(batch=2, size=32, seed=1)
    ref = _torch_encode(vae, images)
    z = encode(ours, jnp.asarray(images))
    assert z.shape == ref.shape == (2, 4, 4, 16)
    assert rel_err(z, ref) <= BOUND
    latents = np.random.default_rng(2).standard_normal((3, 4, 6, 16)).astype(np.float32)  # non-square
    ref_img = _torch_decode(vae, latents)
    img = decode(ours, jnp.asarray(latents))
    assert img.shape == ref_img.shape == (3, 32, 48, 3)
    assert rel_err(img, ref_img) <= BOUND
    assert rel_err(decode(ours, jnp.asarray(latents), 2), img) <= 1e-5  # chunks of 2 and 1
    # low-contrast inputs (GroupNorm variances near its eps): the fixture sees a wrong eps by 10x at least
    faint, faint_latents = images * 0.1, latents * 0.03
    ref_faint, ref_faint_img = _torch_encode(vae, faint), _torch_decode(vae, faint_latents)
    assert rel_err(encode(ours, jnp.asarray(faint)), ref_faint) <= BOUND
    assert rel_err(decode(ours, jnp.asarray(faint_latents)), ref_faint_img) <= BOUND
    bad = _wrong_eps(autoencoder.load(out))
    assert rel_err(encode(bad, jnp.asarray(faint)), ref_faint) >= MISS
    assert rel_err(decode(bad, jnp.asarray(faint_latents)), ref_faint_img) >= MISS


def test_encode_options_and_errors(converted):
    _, out = converted
    ours = autoencoder.load(out)
    images = jnp.asarray(er.vae_images(batch=1, size=16, seed=3))
    mean, sample = nnx.jit(lambda m, x, k: (m.encode(x), m.encode(x, key=k)))(ours, images, jax.random.key(0))
    assert sample.shape == mean.shape and not np.allclose(sample, mean)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(images[:, :12])
    with pytest.raises(ValueError, match="16 channels"):
        ours.decode(jnp.zeros((1, 2, 2, 4)))
    from dd_jax import icd

    assert autoencoder.pack is icd.pack and autoencoder.unpack is icd.unpack


def test_bfloat16_load(converted):
    vae, out = converted
    ours = autoencoder.load(out, dtype=jnp.bfloat16)
    images = er.vae_images(batch=1, size=32, seed=4)
    z = encode(ours, jnp.asarray(images))
    assert z.dtype == jnp.float32  # latents leave the autoencoder in float32
    assert rel_err(z, _torch_encode(vae, images)) <= 5e-2


def _random_bfl_state(params, seed):
    """Random weights under BFL names: conv [O, I, kh, kw], attention q/k/v/proj_out as 1x1 convs."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    _, st = nnx.split(autoencoder.abstract(params))
    state = {}
    for path, var in nnx.to_flat_state(st):
        name, shape = ".".join(map(str, path)), var.get_value().shape
        if name.endswith(".kernel"):
            name = name[: -len("kernel")] + "weight"
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0], 1, 1)
            fan_in = int(np.prod(shape[1:]))
            state[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif name.endswith(".scale"):
            state[name[: -len("scale")] + "weight"] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return state


def test_bfl_file_parity_via_cli(tmp_path):
    """A BFL/LDM-named file: diffusers' own LDM->diffusers mapping builds the reference."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {**er.VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 32}
    params = ae_maps.params_from_diffusers_config(config)
    state = _random_bfl_state(params, seed=5)
    reference = AutoencoderKL(**config).eval()
    diffusers_state = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in state.items()}, config)
    reference.load_state_dict(diffusers_state, strict=True)
    path = tmp_path / "ae.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in state.items()}, str(path))  # with an LDM prefix
    rc = convert.main(["--source", str(path), "--output", str(tmp_path / "out"), "--components", "vae", "--quiet"])
    assert rc == 0
    ours = autoencoder.load(str(tmp_path / "out"))
    assert ours.params == params
    images = er.vae_images(batch=1, size=16, seed=6)
    assert rel_err(encode(ours, jnp.asarray(images)), _torch_encode(reference, images)) <= 1e-4
    latents = np.random.default_rng(7).standard_normal((1, 2, 2, 16)).astype(np.float32)
    assert rel_err(decode(ours, jnp.asarray(latents)), _torch_decode(reference, latents)) <= 1e-4


def test_mismatched_checkpoint_fails_before_writing(converted, tmp_path):
    vae, _ = converted
    src = tmp_path / "vae"
    vae.save_pretrained(src)
    f = src / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state["decoder.up_blocks.0.resnets.0.conv_shortcut.weight"] = state.pop(
        "decoder.up_blocks.0.resnets.0.conv1.weight")
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"up_blocks\.0\.resnets\.0\.conv1\.weight"):
        ae_maps.convert_autoencoder(str(src), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []
