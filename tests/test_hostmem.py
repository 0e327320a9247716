"""keep_freed_host_memory(): XLA:CPU's per-step temporary buffer is reused instead of page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dd_jax import hostmem

PROBE = r"""
import json, resource, sys, time
from dd_jax import hostmem
tuned = hostmem.keep_freed_host_memory()
import jax, jax.numpy as jnp
# a program with a 64 MB temporary (a matmul's output feeding another), far above glibc's mmap threshold
f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((256, 256), jnp.float32), jnp.ones((256, 65536), jnp.float32) * 1e-3
# XLA frees the temporary on a worker thread, possibly after block_until_ready returns; on a busy machine the
# next call can then allocate before that free lands and the heap grows (the RSS cost in docs/speed.md). The pause
# lets each free land, so what is measured is only whether freed memory is reused or returned to the OS.
def call():
    f(x, w).block_until_ready()
    time.sleep(0.1)
for _ in range(10):  # warm-up
    call()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    call()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0}))
"""


def _probe(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    default = _probe({"DD_JAX_HOST_MALLOC": "default"})
    tuned = _probe({"DD_JAX_HOST_MALLOC": ""})
    assert not default["tuned"] and tuned["tuned"]
    # six runs of a 64 MB temporary: ~16k page faults each with the defaults (munmap, then a fresh mmap);
    # kept, the heap reuses it and nothing is faulted in (0 in 14 of 14 probes with three CPU hogs beside it)
    assert default["faults"] > 60_000, default
    assert tuned["faults"] < default["faults"] / 4, (tuned, default)


def test_opt_out_and_once_per_process(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setenv("DD_JAX_HOST_MALLOC", "default")
    assert hostmem.keep_freed_host_memory() is False and not hostmem.applied()
    monkeypatch.setenv("DD_JAX_HOST_MALLOC", "")
    assert hostmem.keep_freed_host_memory() is False  # decided once per process


def test_only_when_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not hostmem.jax_runs_on_cpu()
    monkeypatch.setattr(hostmem, "_applied", None)
    assert hostmem.keep_freed_host_memory() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.jax_runs_on_cpu()


GROWTH_PROBE = r"""
import ctypes, json
from dd_jax import hostmem
tuned = hostmem.keep_freed_host_memory()
for _ in range(hostmem.BASELINE_READINGS):
    hostmem.trim_if_grown()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)  # touched: resident
libc.free(p)
kept = hostmem.resident_bytes()
trimmed = hostmem.trim_if_grown()
print(json.dumps({"tuned": tuned, "kept": kept, "trimmed": trimmed, "after": hostmem.resident_bytes(),
                  "again": hostmem.trim_if_grown(), "trims": hostmem.trims()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_grown_heap_is_given_back():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda extra: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", GROWTH_PROBE], env={**env, **extra}, capture_output=True, text=True,
        timeout=120, check=True).stdout)
    tuned = run({"DD_JAX_HOST_MALLOC": ""})
    # a freed 256 MB block stays resident in the tuned heap, then the trim gives it back, once
    assert tuned["tuned"] and tuned["trimmed"] and tuned["trims"] == 1 and not tuned["again"], tuned
    assert tuned["kept"] - tuned["after"] > 200 << 20, tuned
    default = run({"DD_JAX_HOST_MALLOC": "default"})  # untuned: the block was unmapped on free; nothing to do
    assert not default["tuned"] and not default["trimmed"] and default["kept"] < tuned["kept"] - (200 << 20)


def test_trim_policy(monkeypatch):
    calls, rss = [], []
    monkeypatch.setattr(hostmem, "_applied", True)
    monkeypatch.setattr(hostmem, "_libc", type("Libc", (), {"malloc_trim": staticmethod(calls.append)}))
    monkeypatch.setattr(hostmem, "_baseline", None)
    monkeypatch.setattr(hostmem, "_readings", 0)
    monkeypatch.setattr(hostmem, "_trims", 0)
    monkeypatch.setattr(hostmem, "resident_bytes", lambda: rss.pop(0))

    def step(*values):
        rss.extend(values)
        return hostmem.trim_if_grown()

    # the baseline is the largest of the first three readings (the first step's buffers may not exist yet)
    assert not step(100) and not step(200) and not step(150)
    assert not step(300)  # 1.5x the baseline: kept
    assert step(301, 120) and calls == [0] and hostmem.trims() == 1  # above: trimmed; 120 left in use
    assert not step(300)
    assert step(400, 350)  # live memory grew to 350: the baseline follows it ...
    assert not step(500) and step(526, 200) and hostmem.trims() == 3  # ... so only above 525 trims again
    monkeypatch.setattr(hostmem, "_applied", False)
    assert not hostmem.trim_if_grown()  # untuned: never (and no reading is taken)


def test_release_free_memory(monkeypatch):
    calls = []
    libc = type("Libc", (), {"malloc_trim": staticmethod(calls.append)})
    monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda name: libc)
    hostmem.release_free_memory()  # untuned too: the model-folder writer calls it after every group
    assert calls == [0]

    def no_glibc(name):
        raise OSError(name)

    monkeypatch.setattr(hostmem.ctypes, "CDLL", no_glibc)
    hostmem.release_free_memory()  # another libc: only the garbage collection, no error


def test_the_allocator_workarounds_live_in_hostmem():
    """No other module calls malloc_trim / mallopt, and the train loop's waiting does not depend on them."""
    package = os.path.dirname(os.path.abspath(hostmem.__file__))
    others = [os.path.join(d, f) for d, _, fs in os.walk(package) for f in fs
              if f.endswith(".py") and os.path.join(d, f) != os.path.abspath(hostmem.__file__)]
    calls = (".malloc_trim(", ".mallopt(", "import ctypes")
    assert [p for p in others if any(w in open(p).read() for w in calls)] == []
    assert "hostmem.applied" not in open(os.path.join(package, "train.py")).read()
