"""Where a profiled step's device time goes: a summary of the trace `jax.profiler.trace` writes.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        ...                                                       # the steps to profile
    summary = profile_summary.summarize(profile_summary.load(profile_summary.find_trace(log_dir)))

The profiler writes an `.xplane.pb` (needs tensorflow / tensorboard-plugin-profile protos to read) and a
Chrome-trace JSON beside it (`*.trace.json.gz`; `perfetto_trace.json.gz` with `create_perfetto_trace`):
`{"traceEvents": [...]}`, complete events `{"ph": "X", "pid", "tid", "ts", "dur", "name", "args"}` in
microseconds, and metadata events naming each process (`/device:GPU:0`, `/host:CPU`) and thread. Only json
and gzip are needed here (no JAX), so a trace from a GPU run can be summarized anywhere.

Which events are the device's work:
- a GPU: the device process's stream threads ("Stream #..."): one event per kernel, memcpy or memset, named
  after the kernel (cuBLAS / cuDNN / XLA's own), `args.hlo_op` the HLO instruction that launched it. The
  derived lines beside them ("XLA Ops", "XLA Modules", "Steps", ...) repeat the same time and are left out
  (used only when a trace has no stream lines);
- the CPU (no device process): host events with an `args.hlo_op`, the XLA:CPU thunks (intra-op threads
  included, so events overlap; "busy" is their union).

Each event gets a category from its kernel name and HLO op (`categorize`): matmul (GEMMs: cuBLAS, CUTLASS,
Triton GEMM fusions, XLA:CPU dots and YNNPACK/oneDNN library fusions), attention (cuDNN fused attention,
flash kernels), convolution, collective, copy_transpose (memcpy/memset, copies, transposes, dynamic update
slices, concatenates), fusion (XLA's loop/input/Triton fusions and single elementwise ops) or other. Idle is
the window less the union of the events: the trace's span (first event start to last event end) and, when
the caller gives it, the wall time measured around the steps.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict

CATEGORIES = ("matmul", "attention", "convolution", "fusion", "copy_transpose", "collective", "other")
# first match wins, so the more specific patterns come first (a "gemm_fusion" is a matmul, a cuDNN
# "..._flash_fprop_..." is attention, an "xmma_fprop_implicit_gemm" is a convolution)
_RULES = (
    ("collective", r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter|all[-_]to[-_]all|collective[-_]permute"),
    ("attention", r"fmha|flash|sdpa|attention|(^|[^a-z])mha"),
    ("convolution", r"conv(?!ert)|implicit_gemm|dgrad|wgrad|winograd"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|(^|[^a-z])dot|ynn|onednn|xnn"),
    ("copy_transpose", r"memcpy|memset|copy|transpose|dynamic[-_]update[-_]slice|concatenate"),
    ("fusion", r"fusion|^wrapped_|^loop_|^input_|triton|reduce|broadcast|convert|select|elementwise|iota|"
               r"scatter|gather|slice|multiply|add|rsqrt|tanh|negate|subtract|divide|maximum|compare"),
)
_COMPILED = tuple((cat, re.compile(p)) for cat, p in _RULES)
DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Launch Stats", "Source code", "TensorFlow Ops",
                 "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope", "Async XLA Ops", "XLA TraceMe")


def categorize(name: str, hlo_op: str = "") -> str:
    """The category of a kernel (or XLA:CPU thunk) from its name, then from the HLO op that launched it."""
    for text in (name.lower(), (hlo_op or "").lower()):
        if not text:
            continue
        for cat, pat in _COMPILED:
            if pat.search(text):
                return cat
    return "other"


def find_trace(log_dir: str) -> str:
    """The newest trace JSON under `log_dir` (perfetto_trace.json.gz first, else *.trace.json.gz)."""
    found = []
    for root, _, files in os.walk(log_dir):
        for f in files:
            if f == "perfetto_trace.json.gz" or f.endswith(".trace.json.gz"):
                found.append((f != "perfetto_trace.json.gz", -os.path.getmtime(os.path.join(root, f)),
                              os.path.join(root, f)))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {log_dir}")
    return min(found)[2]


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def device_events(trace: dict) -> tuple[list[dict], str]:
    """(the complete events that are device work, where they came from): see the module docstring."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e.get("pid"), e.get("tid")] = str(e.get("args", {}).get("name", ""))
    complete = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
    devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if devices:
        on_device = [e for e in complete if e.get("pid") in devices]
        line = lambda e: threads.get((e.get("pid"), e.get("tid")), "")  # noqa: E731
        streams = [e for e in on_device if line(e).startswith("Stream")]
        if streams:
            return streams, "device streams"
        ops = [e for e in on_device if line(e) == "XLA Ops"]
        if ops:
            return ops, "device XLA Ops line"
        rest = [e for e in on_device if line(e) not in DERIVED_LINES]
        if rest:
            return rest, "device lines"
    host_ops = [e for e in complete if "hlo_op" in (e.get("args") or {}) and not str(e.get("name")).startswith("end:")]
    return host_ops, "host XLA ops (no device lines)"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(trace: dict, wall_s: float | None = None, top: int = 15) -> dict:
    """Device time by category, idle time and the `top` kernels by total time (milliseconds).

    `wall_s`: the wall time measured around the profiled steps, if known (idle_wall_ms = it less busy)."""
    events, source = device_events(trace)
    out: dict = {"source": source, "events": len(events)}
    if not events:
        out.update(categories_ms={c: 0.0 for c in CATEGORIES}, top_kernels=[], note="no device events in the trace")
        return out
    by_cat: dict[str, float] = defaultdict(float)
    count_cat: dict[str, int] = defaultdict(int)
    kernels: dict[str, dict] = {}
    modules: dict[str, float] = defaultdict(float)
    intervals = []
    for e in events:
        name, args, dur = str(e.get("name", "")), e.get("args") or {}, float(e["dur"])
        hlo_op = str(args.get("hlo_op", ""))
        cat = categorize(name, hlo_op)
        by_cat[cat] += dur
        count_cat[cat] += 1
        k = kernels.setdefault(name, {"name": name, "category": cat, "count": 0, "total_us": 0.0, "hlo_op": hlo_op})
        k["count"] += 1
        k["total_us"] += dur
        if args.get("hlo_module"):
            modules[str(args["hlo_module"])] += dur
        ts = float(e.get("ts", 0.0))
        intervals.append((ts, ts + dur))
    kernel_us = sum(by_cat.values())
    busy = _union_us(intervals)
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    window = span if wall_s is None else max(wall_s * 1e6, busy)
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    out.update(span_ms=ms(span), busy_ms=ms(busy), idle_ms=ms(span - busy), kernel_ms=ms(kernel_us),
               overlap_ms=ms(kernel_us - busy))
    if wall_s is not None:
        out.update(wall_ms=ms(wall_s * 1e6), idle_wall_ms=ms(max(wall_s * 1e6 - busy, 0.0)))
    out["window"] = "wall (measured around the steps)" if wall_s is not None else "span (first to last event)"
    out["categories_ms"] = {c: ms(by_cat.get(c, 0.0)) for c in CATEGORIES}
    out["categories_ms"]["idle"] = ms(window - busy)
    out["categories_count"] = {c: count_cat.get(c, 0) for c in CATEGORIES}
    # fractions of the window: with one stream (no overlap) they sum to 1
    out["fractions"] = {c: round(v * 1e3 / window, 4) for c, v in out["categories_ms"].items()}
    ranked = sorted(kernels.values(), key=lambda k: -k["total_us"])[:top]
    out["top_kernels"] = [{"name": k["name"][:200], "category": k["category"], "count": k["count"],
                           "total_ms": ms(k["total_us"]), "mean_us": round(k["total_us"] / k["count"], 2),
                           "fraction_of_kernel_time": round(k["total_us"] / kernel_us, 4),
                           "hlo_op": k["hlo_op"][:120]} for k in ranked]
    out["modules_ms"] = {m: ms(v) for m, v in sorted(modules.items(), key=lambda kv: -kv[1])[:8]}
    return out


def table(summary: dict) -> str:
    """A few lines for a terminal: the categories, then the top kernels."""
    lines = [f"{summary.get('source')}: {summary.get('events')} events, busy {summary.get('busy_ms')} ms of "
             f"{summary.get('wall_ms', summary.get('span_ms'))} ms"]
    for c, v in summary.get("categories_ms", {}).items():
        lines.append(f"  {c:15s} {v:10.3f} ms  {summary.get('fractions', {}).get(c, 0.0):6.1%}")
    for k in summary.get("top_kernels", []):
        lines.append(f"  {k['total_ms']:10.3f} ms x{k['count']:<5d} {k['category']:14s} {k['name'][:70]}")
    return "\n".join(lines)
