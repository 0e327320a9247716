"""The device check's profile and train-sweep sections, and the summary that ranks its train rows.

scripts/device_check.py (the driver) runs these in its child processes, with its helpers (`device_check.sizes`,
`config_for`, `build_on_device`, ...), and puts `summary_rows` into the JSON's summary:

- profile: a `jax.profiler` trace of the production 512x512 train step (3 steps after a warm one; --dry: 2)
  summarized by `dd_jax.profile_summary`: device time by category (matmul, attention, convolution, fusion,
  copy_transpose, collective, other, idle) per step and the top 15 kernels;
- train_sweep: the production train step over batch sizes and remat policies at 512x512 and 1024x1024 ICD,
  one row each, named `<shape>_b<batch>_<remat>` (e.g. `512x512_b2_proj`): step time, time per example,
  MFU, peak memory (device.memory_stats() and XLA's memory analysis) or "oom". Compiles dominate (tens of
  seconds a row on an H100), so the rows run in `plan` order, the most telling first, while the section's
  time lasts, each under its own time limit; a policy that ran out of memory at one batch is skipped at the
  larger ones, and a fallback row runs only where the row it stands in for ran out of memory. Every row of
  the full grid that did not run is listed under "skipped" with why.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time

SHAPES = ("512x512", "1024x1024")
# dd_jax.models.flux.REMAT_POLICIES' names (tests/test_device_check.py checks), here without importing JAX
REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "proj", "proj_attn", "attn", "offload")
BATCHES = (1, 2, 4)
# (shape, batch, remat, the row it stands in for: run only if that one ran out of memory), most telling first
PLAN = (
    ("512x512", 1, "proj", None),  # train_512x512's step: a compilation-cache hit, the baseline
    ("512x512", 1, "proj_attn", None),  # proj without recomputing attention's forward (+1.3 GB at flux-dev)
    ("512x512", 1, "none", None),  # what remat costs: no recomputation at all
    ("512x512", 2, "proj", None),  # what batching gains
    ("512x512", 2, "proj_attn", None),
    ("1024x1024", 1, "proj", None),
    ("1024x1024", 1, "full", "1024x1024_b1_proj"),
    ("512x512", 4, "proj", None),
    ("512x512", 2, "none", None),
    ("512x512", 4, "full", "512x512_b4_proj"),
    ("512x512", 1, "dots_no_batch", None),
    ("512x512", 1, "attn", None),
    ("1024x1024", 2, "proj", None),
    ("1024x1024", 2, "full", "1024x1024_b2_proj"),
)
DRY_PLAN = (("512x512", 1, "proj", None), ("1024x1024", 2, "full", None))
EST_S = {"512x512": 45.0, "1024x1024": 60.0}  # a row's cost on an H100 (lower + compile + 4 steps), for planning
ROW_LIMIT_S = {"512x512": 100.0, "1024x1024": 130.0}  # the parent kills a row past this
NOT_PLANNED = {
    "dots": "not planned: it keeps what dots_no_batch keeps plus attention's batched matmuls, which cuDNN "
            "attention (one custom call) does not have",
    "offload": "not planned: it moves activations to host memory, for when no on-device policy fits",
}


def row_name(shape: str, batch: int, remat: str) -> str:
    return f"{shape}_b{batch}_{remat}"


def plan(dry: bool) -> list[dict]:
    return [dict(name=row_name(s, b, r), shape=s, batch=b, remat=r, fallback_for=f)
            for s, b, r, f in (DRY_PLAN if dry else PLAN)]


def why_not(row: dict, rows: dict) -> str | None:
    """Why `row` should not run given the rows measured so far (`rows`: name -> record); None: run it."""
    f = row["fallback_for"]
    if f:
        status = rows.get(f, {}).get("status")
        if status is None:
            return f"not needed: it stands in for {f}, which did not run"
        if status != "oom":
            return f"not needed: {f} fit ({status})"
    for b in BATCHES:
        smaller = rows.get(row_name(row["shape"], b, row["remat"]), {})
        if b < row["batch"] and smaller.get("status") == "oom":
            return f"skipped: {row['remat']} ran out of memory at batch {b}"
    return None


def run_plan(rows_plan: list[dict], rows: dict, run_row, seconds_left, est_s) -> dict:
    """Runs the planned rows in order (`run_row(row) -> record`, kept in `rows` by name) while
    `seconds_left()` covers `est_s(row)`; returns {name: reason} for the planned rows that did not run.
    Rows already in `rows` (a resumed sweep) are not run again."""
    skipped = {}
    for row in rows_plan:
        name = row["name"]
        if name in rows:
            continue
        reason = why_not(row, rows)
        if reason is None and seconds_left() < est_s(row):
            reason = f"skipped: the sweep's time ran out ({seconds_left():.0f} s left, a row needs ~{est_s(row):.0f} s)"
        if reason:
            skipped[name] = reason
            continue
        rows[name] = run_row(row)
    return skipped


def not_planned(rows_plan: list[dict], policies) -> dict:
    """{name: reason} for every row of the full grid (SHAPES x BATCHES x policies) outside the plan."""
    planned = {r["name"] for r in rows_plan}
    out = {}
    for s in SHAPES:
        for b in BATCHES:
            for p in policies:
                name = row_name(s, b, p)
                if name not in planned:
                    out[name] = NOT_PLANNED.get(p, "not planned: lower priority than the planned rows (PLAN in "
                                                   "scripts/device_sections.py)")
    return out


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


# ----------------------------------------------------------------------------- the sections (child side)


def section_train_sweep(rec: dict, dry: bool, save, ctx) -> None:
    """The rows of `plan(dry)` (see the module docstring) in one process: the model is built once (random
    weights, as the train sections) and each row sets its remat policy and batch, lowers and compiles the
    production step, predicts from XLA's memory analysis whether it fits (an "oom" row that does not is
    never run, so the donated state survives) and times it."""
    import device_check as dc
    import jax
    import numpy as np
    from flax import nnx

    from dd_jax import flow, perf, system as system_lib
    from dd_jax.models import flux

    s = dc.sizes(dry)
    rows = rec.setdefault("rows", {})
    rows_plan = plan(dry)
    rec["plan"] = [r["name"] for r in rows_plan]
    rec["shapes"] = {k: list(v) for k, v in s["sweep_images"].items()}
    rec["not_planned"] = not_planned(rows_plan, flux.REMAT_POLICIES)
    state: dict = {}
    vae_flops: dict = {}

    def build():
        state.clear()
        gc.collect()
        h, w = s["sweep_images"]["512x512"]
        config = dc.config_for(dry, h, w, "proj")
        t0 = time.perf_counter()
        state["system"], state["optimizer"] = dc.build_on_device(config)
        dc.jax_block(nnx.state(state["system"].model))
        state["config"] = config
        rec.setdefault("init_s", []).append(time.perf_counter() - t0)

    def run_row(row):
        out = {"shape": row["shape"], "batch": row["batch"], "remat": row["remat"]}
        rows[row["name"]] = out
        ctx.set_row(row["name"], ROW_LIMIT_S[row["shape"]] * ctx.scale)
        try:
            measure(row, out)
        except Exception as e:  # noqa: BLE001 - recorded; the next row runs
            out["status"] = "oom" if is_oom(e) else "error"
            out["error"] = f"{type(e).__name__}: {e}"[:1500]
            if out.get("ran"):  # failed while running: the donated LoRA/optimizer state may be gone
                build()
        out.setdefault("status", "ok")
        save()
        return out

    def measure(row, out):
        if "system" not in state:
            build()
        system, optimizer, config = state["system"], state["optimizer"], state["config"]
        height, width = s["sweep_images"][row["shape"]]
        config.data.height, config.data.width, config.data.batch_size = height, width, row["batch"]
        system.model.transformer.remat = row["remat"]  # read when the step is traced
        step = flow.system_step(system)
        batch = dc.random_batch(config, s["txt"])
        key = jax.random.key(0)
        t0 = time.perf_counter()
        lowered = step.lower(system.model, optimizer, batch, key)
        out["lower_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = time.perf_counter() - t0  # a cache hit where an earlier section compiled this step
        out["xla_memory"] = dc.memory_facts(compiled)
        del lowered
        before = dc.device_memory()
        out["memory_before"] = before
        mem = out["xla_memory"]
        need = mem.get("temp_size_in_bytes", 0) + max(mem.get("output_size_in_bytes", 0)
                                                      - mem.get("alias_size_in_bytes", 0), 0)
        out["xla_peak_bytes"] = mem.get("argument_size_in_bytes", 0) + need  # as docs/memory_plan.md counts it
        if "bytes_limit" in before:
            free = before["bytes_limit"] - before.get("bytes_in_use", 0)
            out.update(needs_bytes=need, free_bytes=free)
            if need > free:
                out.update(status="oom", oom_predicted=True,
                           note="not run: XLA's memory analysis needs more than the device has free")
                return
        params = system_lib.flux_params(config.model)
        h, w = system.grid(height, width)
        n_img = h * w * len(system.spec.layers)
        flops = perf.flux_step_flops(params, batch=row["batch"], img_tokens=n_img, txt_tokens=s["txt"],
                                     lora_rank=config.lora.rank, lora_targets=tuple(config.lora.targets),
                                     train=True, cond_t0=config.icd.condition_t0).total
        if row["shape"] not in vae_flops:  # XLA's count of the VAE encoder per example (linear in the batch)
            one = dc.random_batch(_with_batch(config, 1), s["txt"])
            vae_flops[row["shape"]] = dc.vae_encode_flops(system, one) or 0.0
        flops += vae_flops[row["shape"]] * row["batch"]
        out["ran"] = True
        t0 = time.perf_counter()
        loss, _ = step(system.model, optimizer, batch, key, executable=compiled)
        losses = [float(loss)]
        out["first_call_s"] = time.perf_counter() - t0
        times = []
        for i in range(s["sweep_steps"]):
            t0 = time.perf_counter()
            loss, _ = step(system.model, optimizer, batch, jax.random.fold_in(key, i), executable=compiled)
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
        kind, peak = perf.device_peak()
        step_s = float(np.median(times))
        out.update(image_tokens=n_img, model_flops=flops, step_times_s=times, step_s=step_s,
                   per_example_s=step_s / row["batch"], mfu=perf.mfu(flops, step_s, peak),
                   loss_finite=bool(np.all(np.isfinite(losses))), device_kind=kind, memory=dc.device_memory())
        out["peak_bytes_in_use"] = out["memory"].get("peak_bytes_in_use")  # the process's peak so far
        if not out["loss_finite"]:
            out["status"] = "failed"
        del compiled, batch
        gc.collect()

    def est_s(row):
        return (EST_S[row["shape"]] if not dry else 20.0) * ctx.scale

    rec["skipped"] = run_plan(rows_plan, rows, run_row, ctx.seconds_left, est_s)
    ctx.set_row(None, None)
    rec["memory_note"] = ("peak_bytes_in_use is the process's peak so far (the rows share one process and JAX cannot "
                          "reset it): a row's own only where it is above every earlier row's; xla_peak_bytes is the "
                          "row's own, from XLA's memory analysis")
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    rec["pass"] = bool(ok) and all(r.get("status") in ("ok", "oom", "timeout") for r in rows.values())


def _with_batch(config, batch: int):
    c = config.copy_and_resolve_references()
    c.data.batch_size = batch
    return c


def section_profile(rec: dict, dry: bool, save, ctx) -> None:
    """A jax.profiler trace of the production 512x512 train step, summarized (dd_jax.profile_summary)."""
    import device_check as dc
    import jax
    import numpy as np

    from dd_jax import flow, profile_summary

    s = dc.sizes(dry)
    height, width = s["images"]["512x512"]
    config = dc.config_for(dry, height, width, ctx.remat)
    rec.update(height=height, width=width, remat=ctx.remat, steps=s["profile_steps"])
    t0 = time.perf_counter()
    system, optimizer = dc.build_on_device(config)
    rec["init_s"] = time.perf_counter() - t0
    step = flow.system_step(system)
    batch = dc.random_batch(config, s["txt"])
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(system.model, optimizer, batch, key).compile()
    rec["compile_s"] = time.perf_counter() - t0  # a cache hit after train_512x512
    float(step(system.model, optimizer, batch, key, executable=compiled)[0])  # warm: outside the trace
    save()
    options = None
    try:  # no Python tracer: its events would only slow the steps and swell the trace
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
    except Exception:  # noqa: BLE001 - an older/newer jax without these options: the defaults
        options = None
    log_dir = tempfile.mkdtemp(prefix="device_check_trace.")
    try:
        times = []
        with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
            t_all = time.perf_counter()
            for i in range(s["profile_steps"]):
                t0 = time.perf_counter()
                float(step(system.model, optimizer, batch, jax.random.fold_in(key, i), executable=compiled)[0])
                times.append(time.perf_counter() - t0)
            wall = time.perf_counter() - t_all
        t0 = time.perf_counter()
        path = profile_summary.find_trace(log_dir)
        rec.update(trace_file=os.path.basename(path), trace_bytes=os.path.getsize(path), wall_s=wall,
                   step_times_s=times, step_s=float(np.median(times)))
        summary = profile_summary.summarize(profile_summary.load(path), wall_s=wall, top=15)
        rec["summary_s"] = time.perf_counter() - t0
        n = s["profile_steps"]
        rec["per_step_ms"] = {k: round(v / n, 3) for k, v in summary["categories_ms"].items()}
        rec["profile"] = summary
        if ctx.keep_trace:
            os.makedirs(ctx.keep_trace, exist_ok=True)
            rec["kept_trace"] = shutil.copy(path, os.path.join(ctx.keep_trace, "perfetto_trace.json.gz"))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    rec["pass"] = summary["events"] > 0


# ----------------------------------------------------------------------------- the summary (parent side)


def _per_example(r: dict) -> float | None:
    if r.get("per_example_s"):
        return r["per_example_s"]
    if r.get("step_s"):
        return r["step_s"] / (r.get("batch") or 1)
    return None


def summary_rows(sections: dict) -> dict:
    """Per train row (the train sections and the sweep's rows): step and per-example time, MFU, peak memory,
    and the ratio of its time per example to the torch peer's at the same shape and batch (below 1: dd_jax is
    faster); the sampler's ratio; the fastest row per shape (per example); the profile's categories."""
    peer = sections.get("peer_torch", {})
    peer_train, peer_sample = peer.get("train", {}) or {}, peer.get("sample", {}) or {}
    rows = {}
    for name in ("train_512x512", "train_512x1024"):
        r = sections.get(name, {})
        if r.get("step_s"):
            rows[name] = dict(r, shape=name[len("train_"):], batch=1,
                              peak_bytes_in_use=(r.get("memory") or {}).get("peak_bytes_in_use"))
    for name, r in (sections.get("train_sweep", {}).get("rows") or {}).items():
        rows[name] = r
    out_rows = {}
    for name, r in rows.items():
        row = {"status": r.get("status", "ok"), "remat": r.get("remat"), "batch": r.get("batch")}
        if r.get("step_s"):
            row.update(step_s=r["step_s"], per_example_s=_per_example(r), mfu=r.get("mfu"),
                       peak_gb=_gb(r.get("peak_bytes_in_use")), xla_peak_gb=_gb(r.get("xla_peak_bytes")))
        p = peer_train.get(f"{r.get('shape')}_b{r.get('batch')}", {})
        if p.get("per_example_s") and row.get("per_example_s"):
            row.update(peer_per_example_s=p["per_example_s"], ratio_to_peer=row["per_example_s"] / p["per_example_s"],
                       peer_gradient_checkpointing=p.get("gradient_checkpointing"))
        out_rows[name] = row
    best = {}
    for name, row in out_rows.items():
        shape = rows[name].get("shape")
        if row["status"] == "ok" and row.get("per_example_s") and name in sections.get("train_sweep", {}).get(
                "rows", {}):
            if shape not in best or row["per_example_s"] < best[shape]["per_example_s"]:
                best[shape] = {"row": name, "batch": row["batch"], "remat": row["remat"],
                               "per_example_s": row["per_example_s"], "mfu": row.get("mfu"),
                               "ratio_to_peer": row.get("ratio_to_peer")}
    out = {"train_rows": out_rows, "fastest_per_example": best}
    smp, psmp = sections.get("sample", {}), peer_sample.get("512x512_b1", {})
    if smp.get("step_s"):
        out["sampler"] = {"step_s": smp["step_s"], "mfu": smp.get("mfu"), "peer_step_s": psmp.get("step_s"),
                          "ratio_to_peer": smp["step_s"] / psmp["step_s"] if psmp.get("step_s") else None,
                          "fastest": smp.get("fastest"),
                          "variants": {k: {m: v.get(m) for m in ("step_s", "mfu", "time_vs_lora", "error")}
                                       for k, v in smp.get("variants", {}).items()}}
    if peer:
        out["peer"] = {k: peer.get(k) for k in ("status", "reason", "attention_backend", "device")}
    prof = sections.get("profile", {})
    if prof.get("profile"):
        out["profile"] = {"per_step_ms": prof.get("per_step_ms"), "fractions": prof["profile"].get("fractions"),
                          "top_kernels": [(k["name"][:60], k["category"], k["total_ms"])
                                          for k in prof["profile"].get("top_kernels", [])[:5]]}
    return out


def _gb(x):
    return None if x is None else round(x / 1e9, 2)


def rows_table(rows: dict) -> str:
    """The train rows, one line each, for stdout."""
    lines = [f"{'row':26s} {'status':8s} {'step s':>8s} {'s/example':>9s} {'MFU':>6s} {'peak GB':>8s} "
             f"{'XLA GB':>7s} {'vs peer':>7s}"]
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for name, r in rows.items():
        lines.append(f"{name:26s} {r['status']:8s} {fmt(r.get('step_s'), '8.3f'):>8s} "
                     f"{fmt(r.get('per_example_s'), '9.3f'):>9s} {fmt(r.get('mfu'), '6.3f'):>6s} "
                     f"{fmt(r.get('peak_gb'), '8.1f'):>8s} {fmt(r.get('xla_peak_gb'), '7.1f'):>7s} "
                     f"{fmt(r.get('ratio_to_peer'), '7.2f'):>7s}")
    return "\n".join(lines)


def section_quantized(rec: dict, dry: bool, save, ctx) -> None:
    """Quantized frozen weights (dd_jax.quantize, qwix): the sampler and the QLoRA train step at 512x512 with
    int8 weights, the sampler with fp8 ones, and both with fp8_w8a8 ones (float8 matmuls), from random weights
    made quantized on the device
    (`dd_jax.aot.time_quantized_steps`): compile and step times, weight bytes, the device's peak memory.
    Skipped, saying why, where qwix is not installed (it is one of the carried wheels)."""
    import device_check as dc

    from dd_jax import optional

    try:
        optional.require("qwix", "the quantized rows")
    except optional.MissingPackage as e:
        rec["skipped"] = str(e)
        return
    from dd_jax import aot

    s = dc.sizes(dry)
    height, width = s["images"]["512x512"]
    config = dc.config_for(dry, height, width, ctx.remat)
    rec.update(height=height, width=width, remat=ctx.remat, rows={})
    more = (("fp8", False), ("fp8_w8a8", True))  # fp8_w8a8: float8 matmuls, QLoRA's input gradients included
    for qtype, train in (("int8", True),) + (more if not dry else ()):  # --dry: the code, once
        rec["rows"][qtype] = aot.time_quantized_steps(config, qtype, txt_len=s["txt"], train=train)
        save()
