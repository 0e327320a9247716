"""Test-wide setup: CPU only, deterministic, no hub access."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One persistent XLA compilation cache per test session: the first process to load this file (pytest itself, before
# it starts any xdist worker) creates it; the workers and the CLI subprocesses tests start inherit the variable, so a
# program compiled once (the tiny train step that many tests and CLI runs share) is read back, not compiled again.
# A cache entry that cannot be read is compiled afresh by JAX. Set JAX_COMPILATION_CACHE_DIR to keep one across runs.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dd_jax_test_xla_cache_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

try:  # Grain worker processes read absl flags; pytest is not an absl program.
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
