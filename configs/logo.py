"""The LOGO watermark benchmark (LOGO-H by default; `--config.data.tasks=logo/mid` for LOGO-L), 256x256."""

from configs import base


def get_config():
    c = base.get_config()
    c.data.tasks = "logo/high"
    c.data.height, c.data.width = 256, 256
    c.train.steps = 30_000
    return c
