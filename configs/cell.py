"""cell decomposition at the paper's settings (subtasks IV-VI): flux-dev + LoRA r128, 512x1024, 50k steps."""

from configs import base


def get_config():
    c = base.get_config()
    c.data.tasks = "cell"
    c.data.height, c.data.width = 512, 1024
    c.train.steps = 50_000
    return c
