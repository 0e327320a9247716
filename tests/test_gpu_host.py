"""A simulated GPU host: decomposition, the device check and training with only what such a host has (jax, flax,
optax, orbax, transformers, ...: tests/gpu_host_packages.txt) plus the carried wheels (requirements-gpu-host.txt),
installed as docs/gpu_host.md says (scripts/gpu_host_wheels.sh, pip install --no-deps --target, PYTHONPATH).

The environment is built once per session (scripts/simulate_gpu_host.sh: a Python 3.12 venv from PyPI, about a
minute with pip's cache warm, more without); DD_JAX_GPU_HOST_VENV=DIR keeps it in DIR and reuses it. Decomposition
and the device check run with the training-only wheels hidden too: they need only the host and ml_collections.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = [
    pytest.mark.matrix,
    pytest.mark.skipif(sys.version_info[:2] != (3, 12), reason="the py312 leg's test: the GPU hosts run Python 3.12 "
                       "(it builds its own 3.12 venv from PyPI, minutes; the py311 leg skips it)"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the hosts lack that this project uses (host-packages.txt's "NOT there"), by distribution -> module
HOST_LACKS = {"grain": "grain", "array-record": "array_record", "tensorflow-datasets": "tensorflow_datasets",
              "tensorflow": "tensorflow", "clu": "clu", "ml-collections": "ml_collections",
              "tensorboardx": "tensorboardX", "psd-tools": "psd_tools", "diffusers": "diffusers"}
INFERENCE_NEEDS = {"ml_collections"}  # of the carried wheels, all that decompose and the device check may import
CARRY_MODULES = {"cloudpickle": "cloudpickle", "portpicker": "portpicker"}  # grain's; on the host or not


def carried() -> dict[str, str]:
    """{distribution: module} of requirements-gpu-host.txt."""
    with open(os.path.join(ROOT, "requirements-gpu-host.txt")) as f:
        names = [re.sub(r"[-_.]+", "-", m.group(1)).lower()
                 for m in (re.match(r"\s*([A-Za-z0-9_.-]+)==", line) for line in f) if m]
    return {n: HOST_LACKS.get(n) or CARRY_MODULES.get(n) or n.replace("-", "_") for n in names}


BLOCKER = '''\
import importlib.abc, os, sys
_BLOCKED = set(filter(None, os.environ.get("DD_JAX_TEST_BLOCK", "").split(",")))
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
sys.meta_path.insert(0, _Blocker())
'''


@contextlib.contextmanager
def _locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # xdist workers share one build
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """(python, env): the simulated host's interpreter and the environment a run there uses."""
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # the workers' basetemps are popen-gwN under the session's own
    base = os.environ.get("DD_JAX_GPU_HOST_VENV") or str(session / "gpu_host")
    os.makedirs(base, exist_ok=True)
    venv, wheels, site, blocker = (os.path.join(base, d) for d in ("venv", "wheels", "site", "blocker"))
    with _locked(os.path.join(base, ".lock")):
        if not os.path.exists(os.path.join(base, "ready")):
            t0 = time.time()
            for cmd in (["bash", os.path.join(ROOT, "scripts", "simulate_gpu_host.sh"), venv, ""],
                        ["bash", os.path.join(ROOT, "scripts", "gpu_host_wheels.sh"), wheels]):
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                   env=dict(os.environ, PYTHON=os.path.join(venv, "bin", "python")))
                assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
            r = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "--no-deps",
                                "--no-index", "--target", site] + sorted(
                                    os.path.join(wheels, w) for w in os.listdir(wheels) if w.endswith(".whl")),
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            os.makedirs(blocker, exist_ok=True)
            with open(os.path.join(blocker, "sitecustomize.py"), "w") as f:
                f.write(BLOCKER)
            with open(os.path.join(base, "ready"), "w") as f:
                f.write(f"built in {time.time() - t0:.0f} s\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, site, blocker]), DD_JAX_TEST_BLOCK="")
    return os.path.join(venv, "bin", "python"), env


def run(host, args, block=(), timeout=900, **kwargs):
    python, env = host
    env = dict(env, DD_JAX_TEST_BLOCK=",".join(block))
    return subprocess.run([python] + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          **kwargs)


def inference_hidden() -> list[str]:
    """The carried modules decomposition and the device check must not need (hidden from them)."""
    return sorted(set(carried().values()) - INFERENCE_NEEDS)


def test_the_host_lacks_what_it_lacks_and_has_what_is_carried(host):
    modules = sorted(set(HOST_LACKS.values()) | set(carried().values()))
    code = ("import importlib, json, sys\n"
            "def imports(m):\n"
            "    try:\n"
            "        return bool(importlib.import_module(m))\n"
            "    except ImportError:\n"
            "        return False\n"
            "print(json.dumps({m: imports(m) for m in sys.argv[1:]}))")
    r = run(host, ["-c", code] + modules)
    assert r.returncode == 0, r.stderr[-3000:]
    imports = json.loads(r.stdout.splitlines()[-1])
    expected = {m: m in carried().values() for m in modules}
    assert imports == expected  # e.g. grain imports only because it is carried; tensorflow_datasets never


def test_decompose_needs_only_the_host_and_ml_collections(host, tmp_path):
    out = tmp_path / "out"
    r = run(host, ["-m", "dd_jax.decompose", "--input", "docs/samples", "--output", str(out)], block=inference_hidden())
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [f[:-4] for f in os.listdir(os.path.join(ROOT, "docs", "samples")) if f.endswith(".png")]
    assert samples and {f"{s}_background.png" for s in samples} <= set(os.listdir(out))


def test_decompose_psd_names_psd_tools_in_one_line(host, tmp_path):
    r = run(host, ["-m", "dd_jax.decompose", "--input", "docs/samples", "--output", str(tmp_path / "out"),
                   "--format", "psd"], block=inference_hidden())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        "error: decompose --format psd needs psd-tools: pip install psd-tools==1.10.4"


def test_device_check_dry_needs_only_the_host_and_ml_collections(host, tmp_path):
    out = tmp_path / "dry.json"
    r = run(host, ["scripts/device_check.py", "--dry", "--out", str(out)], block=inference_hidden())
    result = json.loads(out.read_text())
    assert r.returncode == 0, (result["summary"], r.stdout[-2000:], r.stderr[-2000:])
    assert {k: v["forbidden_modules_loaded"] for k, v in result["sections"].items() if v["forbidden_modules_loaded"]} \
        == {}
    if "qwix" in inference_hidden():  # the float8 sampler row needs the carried qwix; the others run without
        assert "qwix" in result["sections"]["sample"]["variants"]["merged_fp8_w8a8"]["skipped"]


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "configs", "default_gpu.py")),
                    reason="configs/default_gpu.py is not in this checkout")
def test_training_runs_with_the_carried_wheels_without_tensorboardx(host, tmp_path):
    workdir = tmp_path / "run"
    r = run(host, ["-m", "dd_jax.train", "--config", "configs/default_gpu.py", f"--workdir={workdir}",
                   "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.data.batch_size=4",
                   "--config.data.worker_count=1", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
                   "--config.mesh.data=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2]
    assert not [f for _, _, fs in os.walk(workdir) for f in fs if "tfevents" in f]  # no tensorboardX there
