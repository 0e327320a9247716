"""Tiny random diffusers Flux transformers, saved as the hub saves them (test helper)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


# Fixtures that see position. With weights ~N(0, 0.2) the q/k RMSNorm scales are ~0.2, the attention
# logits ~0.04 * q.k: nearly uniform attention, which hardly depends on RoPE (zeroing every position id
# moved the output by only 5e-3 of its scale). Scales of 2 give logits of a few units: attention peaked
# enough that a wrong theta or a swapped id axis changes the output by 3e-2 to 0.35 of its scale on a
# non-square 6x10 grid, against 2.6e-5 for the true model (tests/test_flux_position.py).
PEAKED_QK = 2.0
GRID = (6, 10)  # non-square: swapping the row and column axes moves every off-diagonal token


def make_diffusers_flux(guidance: bool = True, seed: int = 0, qk_scale: float | None = None, **overrides):
    """A tiny random diffusers Flux; `qk_scale` sets every q/k RMSNorm weight (PEAKED_QK: position-sensitive)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance, **overrides}).eval()
    with torch.no_grad():  # no zero-initialised tensors: every weight must matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        if qk_scale is not None:
            for name, p in model.named_parameters():
                if any(f".{n}.weight" in name for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                    p.fill_(qk_scale)
    return model


def wrong_rope(kind: str):
    """A deliberately wrong `layers.embed_nd` (to monkeypatch): theta x2, or the row and column axes swapped."""
    import jax.numpy as jnp

    from dd_jax.models import layers

    true = layers.embed_nd
    if kind == "theta_x2":
        return lambda ids, axes_dim, theta: true(ids, axes_dim, 2 * theta)
    if kind == "swapped_axes":
        return lambda ids, axes_dim, theta: true(ids[..., jnp.array([0, 2, 1])], axes_dim, theta)
    raise ValueError(kind)


def inputs(batch=2, h=3, w=5, n_txt=7, in_channels=16, context=24, pooled=20, seed=1, guidance=True):
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    return dict(
        img=rng.standard_normal((batch, h * w, in_channels)).astype(np.float32),
        img_ids=img_ids.reshape(h * w, 3),
        txt=rng.standard_normal((batch, n_txt, context)).astype(np.float32),
        txt_ids=np.zeros((n_txt, 3), np.float32),
        timesteps=rng.uniform(0.05, 0.95, batch).astype(np.float32),
        y=rng.standard_normal((batch, pooled)).astype(np.float32),
        guidance=np.full((batch,), 3.5, np.float32) if guidance else None,
    )


def diffusers_forward(model, x) -> np.ndarray:
    t = lambda a: None if a is None else torch.from_numpy(a)
    with torch.no_grad():
        out = model(hidden_states=t(x["img"]), encoder_hidden_states=t(x["txt"]), pooled_projections=t(x["y"]),
                    timestep=t(x["timesteps"]), img_ids=t(x["img_ids"]), txt_ids=t(x["txt_ids"]),
                    guidance=t(x["guidance"]), return_dict=False)[0]
    return out.numpy()


def jax_forward(model, x) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(x["img"]), jnp.asarray(x["img_ids"]), jnp.asarray(x["txt"]),
                            jnp.asarray(x["txt_ids"]), jnp.asarray(x["timesteps"]), jnp.asarray(x["y"]),
                            None if x["guidance"] is None else jnp.asarray(x["guidance"])), np.float32)


def random_bfl_state(params, seed: int, scale: float = 0.2) -> dict:
    """Random float32 weights under BFL names: our module paths with torch's `.weight` and [out, in] layout."""
    from flax import nnx

    from dd_jax.models import flux

    rng = np.random.default_rng(seed)
    _, st = nnx.split(flux.abstract(params))
    state = {}
    for path, var in nnx.to_flat_state(st):
        shape = var.get_value().shape
        name = ".".join(map(str, path))
        if name.endswith(".kernel"):
            name, shape = name[: -len("kernel")] + "weight", shape[::-1]
        state[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return state


def bfl_to_diffusers(state: dict, hidden: int) -> dict:
    """diffusers' own BFL -> diffusers conversion, with its hard-coded 3072 width replaced."""
    from diffusers.loaders import single_file_utils

    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    namespace = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"](
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
