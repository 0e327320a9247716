"""Flux parity that sees position: peaked attention on a non-square grid, and the margin it buys.

The parity fixtures of tests/test_flux_conversion.py use flat attention on small grids: a RoPE theta
twice too large missed the diffusers test's 1e-4 bound by a hair (1.27e-4) and passed the BFL one,
and no position ids at all moved the output by only 5e-3. Here the q/k RMSNorm scales are 2
(flux_reference.PEAKED_QK) and the grid is 6x10 (flux_reference.GRID), and each test measures,
beside the true model's error, the error of the same converted model with a deliberately wrong
RoPE (monkeypatched `layers.embed_nd`). Relative to the reference's scale (seed 0, batch 2,
measured on XLA:CPU):

    fixture                              true      theta x2   rows<->cols swapped
    diffusers, old (flat, 3x5)           1.4e-5    1.3e-4     5.2e-3
    diffusers, peaked 6x10 (here)        2.6e-5    2.9e-2     3.5e-1
    BFL file, old (flat, 2x3)            1.9e-5    3.7e-5     1.7e-2
    BFL file, peaked 6x10 (here)         3.4e-5    3.4e-2     3.9e-1

The wrong models must miss the 1e-4 bound by 100x at least, so a converter or RoPE that gets
position wrong cannot pass as a rounding difference.
"""

from __future__ import annotations

import flux_reference as fr
import numpy as np
import pytest
from safetensors.numpy import save_file
from tolerance import rel_err

from dd_jax.models import flux, layers
from weights_conversion import convert

BOUND = 1e-4
MISS = 100 * BOUND  # the least error a wrong RoPE must show


def _inputs(**kw):
    h, w = fr.GRID
    return fr.inputs(batch=2, h=h, w=w, guidance=True, **kw)


def _errors(ours, ref: np.ndarray, x, monkeypatch) -> dict[str, float]:
    errs = {"true": rel_err(fr.jax_forward(ours, x), ref)}
    for kind in ("theta_x2", "swapped_axes"):
        with monkeypatch.context() as m:
            m.setattr(layers, "embed_nd", fr.wrong_rope(kind))
            errs[kind] = rel_err(fr.jax_forward(ours, x), ref)
    print("\nerror / reference scale: " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))
    return errs


def _check(errs):
    assert errs["true"] <= BOUND, errs
    assert errs["theta_x2"] >= MISS and errs["swapped_axes"] >= MISS, errs


@pytest.mark.parametrize("rope_in_norm", [True, False])  # RoPE inside the q/k norm's pass (default), or after
def test_diffusers_folder_parity_sees_position(tmp_path, monkeypatch, rope_in_norm):
    model = fr.make_diffusers_flux(guidance=True, seed=0, qk_scale=fr.PEAKED_QK)
    model.save_pretrained(tmp_path / "transformer")
    assert convert.main(["--source", str(tmp_path / "transformer"), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    ours = flux.load(str(tmp_path / "o"), rope_in_norm=rope_in_norm)
    assert all(b.rope_in_norm == rope_in_norm for b in list(ours.double_blocks) + list(ours.single_blocks))
    x = _inputs()
    ref = fr.diffusers_forward(model, x)
    assert ref.shape == (2, fr.GRID[0] * fr.GRID[1], 16)
    _check(_errors(ours, ref, x, monkeypatch))


def test_bfl_file_parity_sees_position(tmp_path, monkeypatch):
    """A BFL single file (theta and axes_dim are not stored in it: the converter supplies them)."""
    from diffusers import FluxTransformer2DModel

    params = flux.FluxParams(in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=64,
                             mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                             theta=10_000, qkv_bias=True, guidance_embed=True)
    state = fr.random_bfl_state(params, seed=7)
    for name in state:
        if name.endswith(("query_norm.scale", "key_norm.scale")):
            state[name] = np.full_like(state[name], fr.PEAKED_QK)
    reference = FluxTransformer2DModel(**{**fr.TINY, "guidance_embeds": True}).eval()
    reference.load_state_dict(fr.bfl_to_diffusers(dict(state), params.hidden_size), strict=True)
    save_file(state, str(tmp_path / "flux1-tiny.safetensors"))
    assert convert.main(["--source", str(tmp_path / "flux1-tiny.safetensors"), "--output", str(tmp_path / "o"),
                         "--axes-dim", "4,6,6", "--quiet"]) == 0
    ours = flux.load(str(tmp_path / "o"))
    assert ours.params == params
    x = _inputs(seed=11)
    _check(_errors(ours, fr.diffusers_forward(reference, x), x, monkeypatch))
