"""Ahead-of-time compilation of the paper's LoRA training step on abstract shapes."""

import os

from dd_jax import aot
from dd_jax.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_config_compiles_on_abstract_shapes():
    """configs/watermark.py (flux-dev + LoRA r128 + Flux VAE, cached text), shrunk in width and depth."""
    c = load_config_file(os.path.join(REPO, "configs", "watermark.py"))
    c.model.params = dict(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12),
                          context_in_dim=32, vec_in_dim=16)
    c.lora.rank = 4
    c.autoencoder.preset = "tiny"
    c.data.height, c.data.width = 32, 64
    r = aot.compile_train_step(c, txt_len=8)
    assert r.compiled is not None and r.flops and r.flops > 0
    # 3 image layers of (32/16) x (64/16) tokens + 8 text tokens
    assert r.tokens == 3 * 2 * 4 + 8
    assert 0 < r.trainable_params < r.total_params
    # the production step: trainable params + optimizer state donated, the frozen base (transformer + VAE)
    # a read-only input that is never returned
    sizes = r.partition_bytes
    assert sizes["frozen"] > sizes["trainable"] > 0 and sizes["optimizer"] > 0
    if r.memory is not None:
        # jit drops inputs the step never reads (the frozen VAE decoder), so the arguments hold all of the
        # donated state but may hold less than the whole frozen base
        assert r.memory.argument_size_in_bytes >= sizes["trainable"] + sizes["optimizer"]
        assert r.memory.argument_size_in_bytes > sizes["frozen"] // 2
        assert r.memory.alias_size_in_bytes >= sizes["trainable"] + sizes["optimizer"]
        assert r.memory.output_size_in_bytes < sizes["frozen"]
