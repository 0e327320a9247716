"""AlphaBlend data: blend laws, synthesis, TFDS builders and the Grain pipeline.

Submodules are imported on demand (``from dd_jax.data import blend``) so that
importing the package stays cheap (no TFDS / Grain import).
"""

from dd_jax.data.blend import TASK_INDEX, TASKS

__all__ = ["TASKS", "TASK_INDEX"]
