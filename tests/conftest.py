"""Test-wide setup: CPU only, deterministic, no hub access."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # Grain worker processes read absl flags; pytest is not an absl program.
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass
