"""dd_jax.profile_summary: device time by category, idle time and the top kernels of a jax.profiler trace,
on small synthetic traces shaped like a GPU's (device stream lines beside derived ones) and the CPU's
(host XLA:CPU thunks). scripts/device_check.py --dry runs it on a real CPU trace (tests/test_device_check.py)."""

from __future__ import annotations

import gzip
import json

import pytest

from dd_jax import profile_summary


def _trace(events, procs, threads):
    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}} for p, n in procs.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": t, "args": {"name": n}}
             for (p, t), n in threads.items()]
    return {"displayTimeUnit": "ns", "traceEvents": meta + events}


def _x(pid, tid, ts, dur, name, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_trace_summary_of_a_gpu_trace(tmp_path):
    """Stream events only (the derived "XLA Ops" line repeats them), each kernel in its category, idle = the
    window less the union of the kernels, the top kernels by total time; read back from a .json.gz."""
    gpu, host = 1, 2
    procs = {gpu: "/device:GPU:0", host: "/host:CPU"}
    threads = {(gpu, 7): "Stream #7(Compute)", (gpu, 8): "Stream #8(MemcpyD2D)", (gpu, 100): "XLA Ops",
               (host, 1): "python"}
    events = [
        _x(gpu, 7, 0, 100, "nvjet_tst_192x192_64x4_h_bz_NNT", hlo_op="custom-call.3", hlo_module="jit__pure"),
        _x(gpu, 7, 100, 50, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wmma_f16_knob_3_128x128",
           hlo_op="custom-call.7", hlo_module="jit__pure"),
        _x(gpu, 7, 150, 30, "loop_multiply_fusion_2", hlo_op="multiply_fusion.2", hlo_module="jit__pure"),
        _x(gpu, 7, 200, 20, "input_reduce_fusion", hlo_op="reduce_fusion", hlo_module="jit__pure"),
        _x(gpu, 7, 220, 10, "loop_transpose_fusion", hlo_op="transpose.1", hlo_module="jit__pure"),
        _x(gpu, 8, 210, 20, "MemcpyD2D"),  # overlaps the reduce on the other stream
        _x(gpu, 7, 300, 40, "nvjet_tst_192x192_64x4_h_bz_NNT", hlo_op="custom-call.9", hlo_module="jit__pure"),
        _x(gpu, 7, 340, 10, "ncclDevKernel_AllReduce_Sum_bf16", hlo_op="all-reduce.1"),
        _x(gpu, 7, 350, 5, "sm80_xmma_fprop_implicit_gemm_bf16", hlo_op="convolution.4"),
        _x(gpu, 7, 355, 5, "redzone_checker"),
        _x(gpu, 100, 0, 400, "fusion.1"),  # a derived line: left out
        _x(host, 1, 0, 1000, "PjitFunction(_pure)"),  # host: left out
    ]
    path = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump(_trace(events, procs, threads), f)
    assert profile_summary.find_trace(str(tmp_path)) == str(path)
    s = profile_summary.summarize(profile_summary.load(str(path)), wall_s=500e-6, top=3)
    assert s["source"] == "device streams" and s["events"] == 10
    assert s["categories_ms"] == {"matmul": 0.14, "attention": 0.05, "convolution": 0.005, "fusion": 0.05,
                                  "copy_transpose": 0.03, "collective": 0.01, "other": 0.005, "idle": 0.23}
    # busy: [0, 180] + [200, 230] + [300, 360] us; the memcpy (210-230) overlaps the other stream
    assert s["busy_ms"] == 0.27 and s["span_ms"] == 0.36 and s["overlap_ms"] == 0.02 and s["wall_ms"] == 0.5
    assert s["fractions"]["idle"] == pytest.approx(0.46)
    top = s["top_kernels"]
    assert [k["category"] for k in top] == ["matmul", "attention", "fusion"]
    assert top[0]["count"] == 2 and top[0]["total_ms"] == 0.14 and top[0]["mean_us"] == 70.0
    assert s["modules_ms"] == {"jit__pure": 0.25}
    no_wall = profile_summary.summarize(profile_summary.load(str(path)))
    assert no_wall["categories_ms"]["idle"] == pytest.approx(0.09) and "wall_ms" not in no_wall
    assert "matmul" in profile_summary.table(s)


def test_trace_summary_of_a_cpu_trace():
    """No device process: the host events that carry an hlo_op (XLA:CPU thunks; "end:" markers left out)."""
    procs, threads = {5: "/host:CPU"}, {(5, 1): "tf_XLAPjRtCpuClient/1", (5, 2): "tf_XLAEigen/2"}
    events = [_x(5, 1, 0, 50, "dot_general.3", hlo_op="dot_general.3", hlo_module="jit_f"),
              _x(5, 1, 50, 0.3, "end: dot_general.3"),
              _x(5, 2, 10, 30, "broadcast_add_fusion", hlo_op="broadcast_add_fusion", hlo_module="jit_f"),
              _x(5, 1, 60, 10, "wrapped_convert", hlo_op="wrapped_convert", hlo_module="jit_f"),
              _x(5, 1, 70, 10, "copy.2", hlo_op="copy.2", hlo_module="jit_f"),
              _x(5, 1, 0, 100, "ThunkExecutor::Execute (wait for completion)")]
    s = profile_summary.summarize(_trace(events, procs, threads))
    assert s["source"].startswith("host XLA ops") and s["events"] == 4
    assert s["categories_ms"]["matmul"] == 0.05 and s["categories_ms"]["fusion"] == 0.04
    assert s["categories_ms"]["copy_transpose"] == 0.01 and s["busy_ms"] == 0.07 and s["idle_ms"] == 0.01
    empty = profile_summary.summarize({"traceEvents": []})
    assert empty["events"] == 0 and empty["top_kernels"] == []


@pytest.mark.parametrize("name,hlo_op,category", [
    ("gemm_fusion_dot_12", "", "matmul"), ("cutlass_80_tensorop_bf16_s16816gemm_relu", "", "matmul"),
    ("ynn_fusion", "ynn_fusion", "matmul"), ("fusion_3", "dot.5", "fusion"), ("kernel_1", "dot.5", "matmul"),
    ("flash_fwd_kernel", "", "attention"), ("xmma_fprop_implicit_gemm", "", "convolution"),
    ("wrapped_convert", "", "fusion"), ("Memset", "", "copy_transpose"),
    ("dynamic_update_slice_fusion", "", "copy_transpose"), ("all-gather-start", "", "collective"),
    ("something", "", "other")])
def test_categorize(name, hlo_op, category):
    assert profile_summary.categorize(name, hlo_op) == category
