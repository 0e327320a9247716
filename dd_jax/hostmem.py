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

The cost is host memory: a step's temporary buffer may be allocated before
the previous step's is freed, and the heap then keeps both. On the mid-size
benchmark the peak RSS was 1.9-3.7 GB with it against 2.0 GB without.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_KEEP = 2**31 - 1  # an int: the largest top-of-heap free space glibc may keep

_applied: bool | None = None


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
    global _applied
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
    return _applied
