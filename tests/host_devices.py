"""Runs a test module as a script in a child process that sees 8 CPU devices (test helper).

XLA fixes the host device count when JAX starts, so a test that needs a mesh
of 8 runs its own file with XLA_FLAGS set; the script prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def with_xla_flags(flags: str) -> str:
    """This process's XLA_FLAGS (conftest's compile options) plus `flags`, for a child process's environment."""
    return (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def run_with_8_devices(script: str, timeout: int = 900) -> dict:
    """The JSON object `script` prints last, run from the repo root with 8 host CPU devices."""
    env = dict(os.environ, XLA_FLAGS=with_xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.abspath(script)], capture_output=True, text=True, env=env,
                       cwd=root, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
