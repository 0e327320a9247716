"""LoRA export: our BFL-named adapters -> a diffusers/peft Flux LoRA file that
`FluxTransformer2DModel.load_lora_adapter` loads and that reproduces our LoRA-adapted output
(fused qkv / linear1 split, scale folded, final adaLN halves)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import flux_reference as fr
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file
from tolerance import rel_err

from configs import flux as flux_config
from dd_jax import checkpoints, lora, system as system_lib
from dd_jax.models import flux
from weights_conversion import flux as flux_maps, lora_export

pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every kind of adapter: fused qkv (double), fused linear1 (single), plain projections, modulation,
# the final adaLN (halves swapped in diffusers) and an embedder.
TARGETS = lora.DEFAULT_TARGETS + lora.MODULATION_TARGETS + (r"final_layer\.adaLN_modulation\.1", r"img_in")
RANK, ALPHA = 3, 5.0



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = fr.make_diffusers_flux(guidance=True, seed=0)
    root = tmp_path_factory.mktemp("lora")
    model.save_pretrained(root / "hub")
    out = flux_maps.convert_transformer(str(root / "hub"), str(root / "converted"), "float32", progress=False)
    return model, out, root


def _randomize_b(transformer, seed=0):
    for i, (_, layer) in enumerate(lora.lora_layers(transformer)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        layer.lora_b.set_value(0.3 * jax.random.normal(key, layer.lora_b.shape, jnp.float32))


def _diffusers_with(model, path):
    torch_model = copy.deepcopy(model)
    torch_model.load_lora_adapter(path, prefix="transformer", adapter_name="dd")
    return torch_model


@pytest.mark.matrix
def test_exported_lora_reproduces_ours_in_diffusers(base, tmp_path):
    model, converted, _ = base
    ours = flux.load(converted)
    x = fr.inputs(batch=2, h=3, w=5, guidance=True)
    plain = fr.jax_forward(ours, x)
    paths = lora.apply_lora(ours, RANK, ALPHA, TARGETS)
    assert any(p.endswith("linear1") for p in paths) and any(p.endswith("img_attn.qkv") for p in paths)
    _randomize_b(ours)
    adapted = fr.jax_forward(ours, x)
    assert rel_err(adapted, plain) > 0.05  # the adapters matter

    path = lora_export.from_model(ours, str(tmp_path / "lora.safetensors"))
    tensors = load_file(path)
    q = "transformer.transformer_blocks.0.attn.to_q"
    assert tensors[f"{q}.lora_A.weight"].shape == (RANK, 64)
    assert tensors[f"{q}.lora_B.weight"].shape == (64, RANK)
    s = "transformer.single_transformer_blocks.1"
    assert tensors[f"{s}.proj_mlp.lora_B.weight"].shape == (256, RANK)
    assert tensors[f"{s}.proj_out.lora_A.weight"].shape == (RANK, 64 + 256)
    np.testing.assert_array_equal(tensors[f"{s}.attn.to_q.lora_A.weight"], tensors[f"{s}.proj_mlp.lora_A.weight"])
    assert "transformer.norm_out.linear.lora_B.weight" in tensors and "transformer.x_embedder.lora_A.weight" in tensors
    # every peft module of a BFL module: 2 double blocks x (3 + 3 + 2 + 4 + 2) + 2 single x (4 + 1 + 1) + 2
    assert len(tensors) == 2 * (2 * 14 + 2 * 6 + 2)

    ref = fr.diffusers_forward(_diffusers_with(model, path), x)
    err = rel_err(adapted, ref)
    print(f"LoRA parity (from a live model): max relative error {err:.2e}")
    assert err <= 1e-4
    # and not by accident: the base model alone is far from it
    assert rel_err(plain, ref) > 0.05


def _run_config(converted):
    c = flux_config.get_config("dev")
    c.model.checkpoint = converted
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.autoencoder.kind = "pixel"  # the export needs no VAE
    c.lora.rank, c.lora.alpha = RANK, ALPHA
    return c


def test_export_cli_from_a_run_export_folder(base, tmp_path):
    model, converted, _ = base
    system = system_lib.build(_run_config(converted))
    _randomize_b(system.model.transformer, seed=1)
    run = tmp_path / "run"
    checkpoints.export(system, str(run / "export"))
    out = tmp_path / "out" / "run_lora.safetensors"
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "export_lora.py"), "--checkpoint", str(run),
                        "--output", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "rank 3, alpha 5" in r.stderr
    x = fr.inputs(batch=1, h=2, w=4, guidance=True, seed=5)
    ref = fr.diffusers_forward(_diffusers_with(model, str(out)), x)
    err = rel_err(fr.jax_forward(system.model.transformer, x), ref)
    print(f"LoRA parity (export_lora.py on a run): max relative error {err:.2e}")
    assert err <= 1e-4
    # bfloat16 file: same names, bf16 values
    out16 = tmp_path / "bf16.safetensors"
    assert lora_export.main(["--checkpoint", str(run / "export"), "--output", str(out16), "--dtype", "bfloat16"]) == 0
    t32, t16 = load_file(str(out)), load_file(str(out16))
    assert sorted(t32) == sorted(t16) and str(next(iter(t16.values())).dtype) == "bfloat16"


def test_stacked_adapters_export_like_per_block_ones():
    rng = np.random.default_rng(0)
    per_block = {}
    for i in range(3):
        per_block[f"double_blocks.{i}.img_attn.qkv.lora_a"] = rng.standard_normal((8, 2)).astype(np.float32)
        per_block[f"double_blocks.{i}.img_attn.qkv.lora_b"] = rng.standard_normal((2, 24)).astype(np.float32)
        per_block[f"single_blocks.{i}.linear1.lora_a"] = rng.standard_normal((8, 2)).astype(np.float32)
        per_block[f"single_blocks.{i}.linear1.lora_b"] = rng.standard_normal((2, 3 * 8 + 32)).astype(np.float32)
    stacked = flux.stack_flat(per_block)
    assert stacked["double_blocks.img_attn.qkv.lora_b"].shape == (3, 2, 24)
    a = lora_export.to_diffusers(lora_export.group_adapters(per_block), 0.5)
    b = lora_export.to_diffusers(lora_export.group_adapters(stacked), 0.5)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # linear1 -> q, k, v (hidden 8 = linear1's input width) and mlp (the rest), B scaled by 0.5
    blk = "transformer.single_transformer_blocks.2"
    got = np.concatenate([a[f"{blk}.{n}.lora_B.weight"] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    np.testing.assert_allclose(got, 0.5 * per_block["single_blocks.2.linear1.lora_b"].T)
    assert a[f"{blk}.proj_mlp.lora_B.weight"].shape == (32, 2)


def test_bad_input(tmp_path, base):
    with pytest.raises(FileNotFoundError, match="neither a trained model folder"):
        lora_export.export_run(str(tmp_path), str(tmp_path / "x.safetensors"))
    with pytest.raises(KeyError, match="no diffusers counterpart"):
        lora_export.to_diffusers({"double_blocks.0.nonsense": (np.zeros((4, 2)), np.zeros((2, 4)))}, 1.0)
    _, converted, _ = base
    c = _run_config(converted)
    c.lora.enabled = False
    c.model.checkpoint = ""
    c.model.params = ml_collections.ConfigDict(dict(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1,
                                                    in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=8,
                                                    axes_dim=(4, 6, 6)))
    checkpoints.export(system_lib.build(c), str(tmp_path / "full" / "export"))
    assert lora_export.main(["--checkpoint", str(tmp_path / "full"), "--output", str(tmp_path / "y.safetensors")]) == 2
