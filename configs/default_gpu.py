"""The default model's recipe for one GPU window: one H100 / H200, at most about 8 minutes, compile included.

The shipped architecture (configs/tiny.py: a 3+3-block MMDiT, hidden 128, pixel autoencoder, learned task
conditioning; 64x64 working size) trained on procedural data (`data.source="procedural"`: examples
synthesized by index in Grain worker processes, no build step, no disk), all six subtasks, whole scenes
("classic") and photo-scale crops ("photo") in turn, starting from the shipped model's parameters.
`train.max_minutes` stops the run in time to save a checkpoint and export it, whatever the device's speed;
rerunning the same command resumes it. The exact command, with the wheels a bare GPU host needs, is in
docs/shipped_model.md.

    python -m dd_jax.train --config configs/default_gpu.py --workdir /tmp/run
"""

from configs import tiny
from dd_jax import checkpoints


def get_config():
    c = tiny.get_config()
    c.data.source = "procedural"
    c.data.style = "classic+photo"
    c.data.dir = ""
    c.data.tasks = "all"
    c.data.batch_size = 64
    c.data.worker_count = 12  # synthesis is the bottleneck of so small a model: 12 of the hosts' 16 cores
    c.mesh.data, c.mesh.fsdp = -1, 1  # replicated parameters (2.7M): no all-gathers
    c.train.init_from = checkpoints.DEFAULT_MODEL
    c.train.steps = 6000
    c.train.max_minutes = 8.0
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 200
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.preview_every = 0
    return c
