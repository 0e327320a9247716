"""Candidate successor of the shipped model: configs/photo.py with 4x4-pixel tokens.

The shipped model's tokens are 8x8 pixels (space-to-depth by 4, then the 2x2
packing): 192 values squeezed into a 128-wide stream, where a watermark's
stroke is a pixel or two wide. Here the pixel autoencoder folds 2x2 blocks
(factor 2), so a token is 4x4 pixels (48 values) and a 64x64 tile is a
16x16 grid: four times the tokens, the same transformer. Trained from
scratch (the input and output projections differ from the shipped model's).
"""

from configs import photo


def get_config():
    c = photo.get_config()
    c.model.params = dict(c.model.params, in_channels=48, out_channels=48)
    c.autoencoder.factor = 2
    c.train.init_from = ""
    c.train.steps = 12000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.checkpoint_every = 250
    return c
