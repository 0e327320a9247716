"""The shipped default model's recipe: the tiny MMDiT trained on native-resolution crops.

Same architecture, method and working size as configs/tiny.py (ICD with LPEC,
x0-prediction with the x0 loss, residual background, 2 Euler steps at 64x64),
but trained on 64x64 windows of 128x128 "photo"-style scenes
(`python -m dd_jax.data.build --style photo`): photos at close to their own
pixel scale, overlays drawn at a photo's pixel scale. Decomposition then runs
tile by tile over the image at its own resolution (`dd_jax.inference`), so a
watermark's thin strokes are seen as they are instead of shrunk away.
The exact data and training commands are in docs/shipped_model.md.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.dir = "data/photo128"
    c.data.crop = "native"  # 64x64 windows of the 128x128 scenes, never resized
    c.train.steps = 6000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.checkpoint_every = 250
    c.train.preview_every = 0
    return c
