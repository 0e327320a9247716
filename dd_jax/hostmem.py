"""Host-memory reuse for XLA:CPU.

XLA:CPU allocates each execution's temporary buffer (about 1 GB for the
mid-size train step) with `posix_memalign` on a worker thread and frees it
when the step ends. glibc serves an allocation that large with a fresh
`mmap` and returns it with `munmap`, so every step page-faults the whole
buffer in again, and the kernel zeroes every page: about 245k page faults
and 0.6 s of system time per mid-size step on a 2-core machine.

`keep_freed_host_memory()` makes glibc keep freed memory for reuse: one
malloc arena for all threads (other arenas fall back to `mmap` for large
blocks), no `mmap` for large blocks, and no trimming of the heap's free top
below 2 GiB. Call it before JAX starts its CPU client: threads that already
own a malloc arena keep it. Our command-line programs call it at start when
JAX will run on the CPU (JAX_PLATFORMS names cpu first, or no GPU/TPU plugin
is installed); `DD_JAX_HOST_MALLOC=default` turns it off. It does nothing
outside glibc.

The cost is host memory. A step's temporary buffer may be allocated before
the previous step's is freed, and small allocations can split a kept buffer
so that the next step's no longer fits; each time, the heap grows by one
buffer. Left alone, the mid-size benchmark's train loop (a sampling step
after every third) grew from 1.9 to 6.3 GiB of RSS in 120 steps, where the
default allocator stays at 1.9 GiB. So the programs also call
`trim_if_grown()` between steps: when the resident size exceeds 1.5x the
largest of its first three readings, it returns the heap's free memory to
the system (`malloc_trim`); the next steps fault that memory in again, once.

`release_free_memory()` is the one other path: code that has just dropped a
large host buffer (the model-folder writer, after each group) hands the
heap's free pages back at once, tuned or not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_KEEP = 2**31 - 1  # an int: the largest top-of-heap free space glibc may keep

GROWTH_LIMIT = 1.5  # trim_if_grown() releases free heap memory above this multiple of the resident baseline
BASELINE_READINGS = 3  # the baseline is the largest of the first readings (the first step may still run)

_applied: bool | None = None
_libc = None
_baseline: int | None = None
_readings = 0
_trims = 0


def applied() -> bool:
    """Whether keep_freed_host_memory() has tuned this process's allocator."""
    return bool(_applied)


def jax_runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU, decided without starting JAX (which would create its threads)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return not any(importlib.util.find_spec(name) for name in plugins)


def keep_freed_host_memory() -> bool:
    """Tunes glibc malloc as described above (once per process) when JAX runs on the CPU; True where it
    applied."""
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DD_JAX_HOST_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux") \
            or not jax_runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_KEEP)))
    if _applied:
        _libc = libc
        _libc.malloc_trim.argtypes, _libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return _applied


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_if_grown() -> bool:
    """Call between steps. Where keep_freed_host_memory() applied and the resident size has grown past
    GROWTH_LIMIT x its baseline, returns the heap's free memory to the system; True where it did. After a
    trim, memory still in use above the baseline raises the baseline, so live growth does not trim every
    step."""
    global _baseline, _readings, _trims
    if not _applied:
        return False
    rss = resident_bytes()
    if rss is None:
        return False
    if _readings < BASELINE_READINGS:
        _readings += 1
        _baseline = max(_baseline or 0, rss)
        return False
    if rss <= GROWTH_LIMIT * _baseline:
        return False
    _libc.malloc_trim(0)
    _trims += 1
    _baseline = max(_baseline, resident_bytes() or 0)
    return True


def trims() -> int:
    """How many times trim_if_grown() has trimmed in this process."""
    return _trims


def release_free_memory() -> None:
    """Collects young garbage, then returns the heap's free memory to the system (`malloc_trim`; glibc only:
    elsewhere only the collection). For a program that has just dropped a large host buffer; the tuning need not
    apply. Generations 0 and 1 only: what was just dropped is young, and a full collection walks every object of
    the process (0.34 s per call in a test process holding torch and transformers, 10 of a tiny pipeline
    conversion's 17 s)."""
    gc.collect(1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
