"""The default model's recipe (configs/default_gpu.py) on a CPU: the same model, data and schedule, at the
batch a 2-core machine steps through in reasonable time, with no time budget. The run folder lives outside
the checkout by default ($DD_JAX_HOME/runs/default_cpu), so the same command resumes it in a later session:

    python -m dd_jax.train --config configs/default_cpu.py
"""

from configs import default_gpu


def get_config():
    c = default_gpu.get_config()
    c.data.batch_size = 16
    c.data.worker_count = 1  # one process synthesizes while the other core steps
    c.train.max_minutes = 0.0
    c.train.steps = 20000
    c.train.checkpoint_every = 200
    c.train.log_every = 50
    return c
