"""Test-wide setup: CPU only, deterministic, no hub access."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# XLA:CPU compiles fast rather than well (LLVM at -O0, no expensive passes): the programs here are tiny and each
# runs a few times, so optimising them cost more than it saved (a test pair of train steps: 58 -> 40 s). The HLO,
# and with it every buffer, alias and sharding the tests check, is the same. Child processes inherit the flags;
# those that force a device count append to them (`host_devices.with_xla_flags`).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()


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
