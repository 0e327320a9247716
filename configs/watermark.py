"""watermark removal at the paper's settings (subtasks I-III): flux-dev + LoRA r128, 512x512, 30k steps."""

from configs import base


def get_config():
    c = base.get_config()
    c.data.tasks = "watermark"
    c.data.height, c.data.width = 512, 512
    c.train.steps = 30_000
    return c
