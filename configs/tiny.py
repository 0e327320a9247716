"""A small model trained from scratch on this CPU, with no external weights.

A 3+3-block MMDiT (hidden 128), a space-to-depth pixel autoencoder in place
of the Flux VAE and a learned task conditioning in place of T5/CLIP, on all
six AlphaBlend subtasks at 64x64 (one task-conditioned model). This is the
shipped default model (dd_jax/assets/tiny); see docs/shipped_model.md for the exact run.

What makes so small a model work (each measured in docs/shipped_model.md / flow.py):
x0-prediction with the x0 loss, the background read as a residual of the
composite (`train.residual`), and adaLN-Zero initialisation (it starts as
the identity decomposition and learns what the foreground changed).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"
    c.model.params = dict(in_channels=192, out_channels=192, vec_in_dim=64, context_in_dim=64, hidden_size=128,
                          num_heads=4, depth=3, depth_single_blocks=3, axes_dim=(8, 12, 12), guidance_embed=False)
    c.model.init = "adaln_zero"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.lora.enabled = False  # all parameters train
    c.autoencoder.kind = "pixel"
    c.autoencoder.factor = 4
    c.text.kind = "task"
    c.data.dir = "data/ab64"
    c.data.tasks = "all"
    c.data.height = c.data.width = 64
    c.data.batch_size = 8
    c.train.steps = 4000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.decay = True
    c.train.t_sampling = "uniform"
    c.train.prediction = "x0"
    c.train.loss = "x0"
    c.train.residual = ("y",)  # background = composite + predicted change
    c.train.t_shift = False
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.preview_every = 1000
    c.sample.tile = True  # native resolution in 64x64 tiles (decompose / evaluate --mode tile)
    c.sample.steps = 2  # chosen on the seed-0 test split (validation): lowest background RMSE (docs/shipped_model.md)
    return c
