"""Tiny random diffusers Flux transformers, saved as the hub saves them (test helper)."""

from __future__ import annotations

import numpy as np
import torch

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


def make_diffusers_flux(guidance: bool = True, seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance, **overrides}).eval()
    with torch.no_grad():  # no zero-initialised tensors: every weight must matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


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
