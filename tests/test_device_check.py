"""scripts/device_check.py: the --dry run (the same code at toy sizes on the CPU) writes every section ok,
imports nothing a GPU host lacks (but in peer_torch's own process), and builds the same train step and optimizer
as dd_jax.train; the sweep's plan, the summary, the torch peer's shapes and the driver's resume of a killed
sweep, each on its own (the trace summary: tests/test_profile_summary.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import device_check  # noqa: E402
import device_sections  # noqa: E402
import peer_torch  # noqa: E402

from dd_jax import profile_summary  # noqa: E402


def test_dry_run_writes_every_section_ok(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "device_check.py"), "--dry", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert list(sections) == [name for name, _, _ in device_check.SECTIONS]
    bad = {k: {x: v.get(x) for x in ("status", "error", "traceback", "log_tail")} for k, v in sections.items()
           if v.get("status") != "ok"}
    assert not bad and r.returncode == 0, (bad, r.stdout[-2000:], r.stderr[-2000:])
    for name, rec in sections.items():
        if name not in device_check.ISOLATED:
            assert rec["forbidden_modules_loaded"] == [], (name, rec["forbidden_modules_loaded"])
    assert sections["versions"]["device_kind"] and sections["versions"]["peak_bf16_flops"] is None  # CPU
    assert sections["correctness"]["pass"] and sections["correctness"]["lora_grad_tensors"] > 0
    for size in ("512x512", "512x1024"):
        t = sections[f"train_{size}"]
        assert t["loss_finite"] and t["step_s"] > 0 and t["compile_s"] > 0
        assert t["model_flops"] > t["model_flops_transformer"] > 0 and t["xla_memory"]["alias_size_in_bytes"] > 0
    assert sections["sample"]["finite"] and sections["sample"]["model_flops_per_step"] > 0
    variants = sections["sample"]["variants"]  # the sampler's variants, each timed and finite
    assert list(variants) == list(device_check.SAMPLE_VARIANTS) and sections["sample"]["fastest"] in variants
    assert all(v["finite"] and v["step_s"] > 0 and v["time_vs_lora"] > 0 for v in variants.values()), variants
    assert variants["merged"]["model_flops_per_step"] < variants["lora"]["model_flops_per_step"]  # no adapters
    assert result["summary"]["sampler"]["variants"]["merged_fp8_w8a8"]["time_vs_lora"] > 0
    assert any(k.startswith("L") for k in sections["attention"])
    assert result["summary"]["statuses"] == {k: "ok" for k in sections}
    # profile: the CPU trace's XLA ops, by category, per step, and the top kernels
    prof = sections["profile"]
    assert prof["profile"]["events"] > 0 and len(prof["profile"]["top_kernels"]) == 15
    assert set(prof["per_step_ms"]) == {*profile_summary.CATEGORIES, "idle"} and prof["per_step_ms"]["fusion"] > 0
    # the sweep: its --dry rows, named <shape>_b<batch>_<remat>, the first a compilation-cache hit of train_512x512
    sweep = sections["train_sweep"]
    assert list(sweep["rows"]) == [r["name"] for r in device_sections.plan(True)]
    for name, row in sweep["rows"].items():
        assert row["status"] == "ok" and row["loss_finite"] and row["per_example_s"] > 0, (name, row)
        assert row["xla_peak_bytes"] > row["xla_memory"]["argument_size_in_bytes"] > 0
    assert sweep["rows"]["512x512_b1_proj"]["compile_s"] < sections["train_512x512"]["compile_s"]
    assert len(sweep["not_planned"]) == 2 * 3 * len(device_sections.REMAT_POLICY_NAMES) - len(sweep["rows"])
    # the torch peer in its own process, without JAX: cuDNN SDPA fails on the CPU, flash runs
    peer = sections["peer_torch"]
    assert peer["attention_backend"] == "flash" and "cudnn" in peer["attention_errors"] and not peer["jax_loaded"]
    assert peer["lora_dtype"] == "torch.float32" and peer["base_dtype"] == "torch.bfloat16"
    assert set(peer["train"]) == {f"{s}_b{b}" for s, b in device_check.sizes(True)["peer_rows"]}
    assert peer["sample"]["512x512_b1"]["step_s"] > 0
    # the summary: per train row its ratio to the peer; the sampler's; the fastest row per shape
    summary = result["summary"]
    for name in sweep["rows"]:
        assert summary["train_rows"][name]["ratio_to_peer"] > 0, summary["train_rows"][name]
    assert summary["train_rows"]["train_512x512"]["ratio_to_peer"] > 0
    assert summary["sampler"]["ratio_to_peer"] > 0
    assert set(summary["fastest_per_example"]) == {r["shape"] for r in device_sections.plan(True)}
    assert "512x512_b1_proj" in r.stdout and "vs peer" in r.stdout


def test_builds_the_step_and_optimizer_train_runs(monkeypatch):
    """device_check cannot import dd_jax.train (its input pipeline needs Grain, which GPU hosts lack); it builds
    the step and optimizer with flow's, which train uses: the same calls to flow."""
    from flax import nnx

    from dd_jax import flow, system as system_lib, train

    calls = {}
    for fn in ("make_train_step", "make_optimizer"):
        def record(*args, _fn=fn, **kwargs):
            calls.setdefault(_fn, []).append((args, kwargs))
            return None
        monkeypatch.setattr(flow, fn, record)
    config = device_check.config_for(True, 64, 64, "proj")
    config.train.decay = True
    system = system_lib.wrap(nnx.eval_shape(lambda: system_lib.build_model(config, load_weights=False)), config)
    for build in (train.make_step, device_check.production_step, flow.system_optimizer,
                  device_check.production_optimizer):
        build(system)
    (a, b), (c, d) = calls["make_train_step"], calls["make_optimizer"]
    assert a == b and c == d


# ----------------------------------------------------------------------------- the sweep's plan


def test_sweep_plan_skips_a_policy_past_its_oom_and_runs_fallbacks_only_where_needed():
    rows_plan = device_sections.plan(False)
    names = [r["name"] for r in rows_plan]
    assert len(set(names)) == len(names) and names[0] == "512x512_b1_proj"
    assert {r["remat"] for r in rows_plan} <= set(device_sections.REMAT_POLICY_NAMES)
    oom = {"512x512_b2_proj", "1024x1024_b1_proj"}
    ran = []

    def run_row(row):
        ran.append(row["name"])
        return {"status": "oom" if row["name"] in oom else "ok"}

    left = iter([1000.0] * 7 + [10.0] * 100)  # time runs out after seven rows
    rows: dict = {}
    skipped = device_sections.run_plan(rows_plan, rows, run_row, lambda: next(left), lambda r: 45.0)
    assert ran == ["512x512_b1_proj", "512x512_b1_proj_attn", "512x512_b1_none", "512x512_b2_proj",
                   "512x512_b2_proj_attn", "1024x1024_b1_proj", "1024x1024_b1_full"]  # full stands in for the
    # 1024 proj that ran out of memory (proj_attn at batch 2 still runs: another policy)
    assert skipped["512x512_b4_proj"] == "skipped: proj ran out of memory at batch 2"
    assert skipped["512x512_b2_none"] == "skipped: the sweep's time ran out (10 s left, a row needs ~45 s)"
    assert skipped["512x512_b4_full"].startswith("not needed: it stands in for 512x512_b4_proj, which did not run")
    assert skipped["512x512_b1_attn"] == "skipped: the sweep's time ran out (10 s left, a row needs ~45 s)"
    assert skipped["1024x1024_b2_proj"] == "skipped: proj ran out of memory at batch 1"
    assert set(ran) | set(skipped) == set(names)
    # a resumed sweep does not run its recorded rows again, a timed-out one included
    again = device_sections.run_plan(rows_plan, {"512x512_b1_proj": {"status": "timeout"}}, run_row,
                                     lambda: 1000.0, lambda r: 45.0)
    assert "512x512_b1_proj" not in again and ran.count("512x512_b1_proj") == 1
    full = next(r for r in rows_plan if r["name"] == "1024x1024_b1_full")
    fits = device_sections.why_not(full, {"1024x1024_b1_proj": {"status": "ok"}})
    assert fits == "not needed: 1024x1024_b1_proj fit (ok)"
    grid = device_sections.not_planned(rows_plan, device_sections.REMAT_POLICY_NAMES)
    assert len(grid) + len(rows_plan) == 2 * 3 * len(device_sections.REMAT_POLICY_NAMES)
    assert grid["512x512_b1_dots"].startswith("not planned: it keeps what dots_no_batch keeps")


def test_remat_policy_names_are_the_models():
    from dd_jax.models import flux

    assert tuple(flux.REMAT_POLICIES) == device_sections.REMAT_POLICY_NAMES


def test_summary_rows_ratios_and_choice():
    sections = {
        "train_512x512": {"step_s": 0.4, "mfu": 0.34, "memory": {"peak_bytes_in_use": 41e9}},
        "sample": {"step_s": 0.13, "mfu": 0.45},
        "train_sweep": {"rows": {
            "512x512_b1_proj": {"shape": "512x512", "batch": 1, "remat": "proj", "status": "ok", "step_s": 0.4,
                                "per_example_s": 0.4, "mfu": 0.34},
            "512x512_b2_proj": {"shape": "512x512", "batch": 2, "remat": "proj", "status": "ok", "step_s": 0.7,
                                "per_example_s": 0.35, "mfu": 0.39},
            "512x512_b4_proj": {"shape": "512x512", "batch": 4, "remat": "proj", "status": "oom"}}},
        "peer_torch": {"status": "ok", "attention_backend": "cudnn",
                       "train": {"512x512_b1": {"per_example_s": 0.5}, "512x512_b2": {"per_example_s": 0.5}},
                       "sample": {"512x512_b1": {"step_s": 0.1}}},
    }
    out = device_sections.summary_rows(sections)
    rows = out["train_rows"]
    assert rows["train_512x512"]["ratio_to_peer"] == pytest.approx(0.8)
    assert rows["512x512_b2_proj"]["ratio_to_peer"] == pytest.approx(0.7)
    assert rows["512x512_b4_proj"] == {"status": "oom", "remat": "proj", "batch": 4}
    assert out["fastest_per_example"]["512x512"]["row"] == "512x512_b2_proj"
    assert out["sampler"]["ratio_to_peer"] == pytest.approx(1.3)
    assert out["peer"]["attention_backend"] == "cudnn"
    table = device_sections.rows_table(rows)
    assert "512x512_b2_proj" in table and "oom" in table


# ----------------------------------------------------------------------------- the torch peer


def test_peer_sizes_are_dd_jax_models():
    from dd_jax.models import autoencoder, flux

    p = flux.PRESETS["flux-dev"]
    assert {k: getattr(p, k) for k in peer_torch.FLUX_DEV} == peer_torch.FLUX_DEV
    for name, ae in peer_torch.AE.items():
        a = autoencoder.PRESETS[name]
        assert {k: getattr(a, k) for k in ae} == ae and a.latent_channels == 16
        assert not a.use_quant_conv and not a.use_post_quant_conv


def test_peer_packs_each_examples_three_layers_in_a_row():
    torch = pytest.importorskip("torch")
    lat = torch.arange(2 * 3 * 16 * 4 * 6, dtype=torch.float32).reshape(6, 16, 4, 6)  # b=2, 3 layers, 2x3 tokens
    tokens = peer_torch.pack(lat, 2, (2, 3))
    assert tokens.shape == (2, 18, 64)
    # example 1, layer 2, token (row 1, col 2): channels (c, 2x2 patch) of latent 1*3+2 at rows 2-3, cols 4-5
    want = lat[5, :, 2:4, 4:6].reshape(64)
    assert torch.equal(tokens[1, 2 * 6 + 1 * 3 + 2], want)


def test_peer_skips_without_diffusers(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "diffusers":
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        if name == "peft":
            raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert peer_torch.missing_package() == "skipped: diffusers not installed (carry its wheel)"
    rec: dict = {}
    peer_torch.section_peer_torch(rec, True, lambda: None, None)
    assert rec == {"status": "skipped", "reason": "skipped: diffusers not installed (carry its wheel)",
                   "missing_package": True}
    assert device_check.not_ok({"sections": {"peer_torch": rec, "sample": {"status": "ok"}}}) == {}
    monkeypatch.setattr(importlib, "import_module", lambda n, *a, **k: fake(n) if n == "peft" else real(n, *a, **k))
    assert peer_torch.missing_package().startswith("skipped: peft not importable (No module named 'accelerate'")


# ----------------------------------------------------------------------------- the driver


def test_only_takes_commas_and_names_unknown_sections(capsys):
    assert device_check.parse_args(["--only", "profile,train_sweep", "sample"]).only == [
        "profile", "train_sweep", "sample"]
    with pytest.raises(SystemExit):
        device_check.parse_args(["--only", "profile,nope"])
    assert "unknown sections ['nope']" in capsys.readouterr().err


STUB_WORKER = textwrap.dedent("""
    import json, sys, time
    a = sys.argv
    arg = lambda k: a[a.index(k) + 1] if k in a else None
    progress, name = arg("--progress"), arg("--sections")
    resume = json.load(open(arg("--resume")))[name] if arg("--resume") else None
    def write(p):
        json.dump(p, open(progress + ".tmp", "w")); __import__("os").replace(progress + ".tmp", progress)
    now = time.time()
    if resume is None:  # first process: row a done, row b hangs past its limit
        rec = {"rows": {"a": {"status": "ok"}, "b": {}}}
        write({"sections": {name: rec}, "current": name, "started": now, "row": "b", "row_deadline": now + 0.5,
               "row_limit_s": 0.5})
        time.sleep(60)
    else:  # the resumed process: goes on with the rows it has not run
        rec = dict(resume, status="ok", seen=sorted(resume["rows"]))
        rec["rows"]["c"] = {"status": "ok"}
        write({"sections": {name: rec}, "current": None, "started": now})
""")


def test_a_sweep_killed_at_a_rows_limit_resumes_in_a_fresh_process(tmp_path, monkeypatch):
    stub = tmp_path / "stub_worker.py"
    stub.write_text(STUB_WORKER)
    monkeypatch.setattr(device_check, "__file__", str(stub))
    args = device_check.parse_args(["--out", str(tmp_path / "out.json"), "--only", "train_sweep"])
    args.scale, args.budget = 1, 60.0
    result: dict = {"sections": {}}
    t0 = time.time()
    pending = device_check.run_group(args, [("train_sweep", 30.0, True)], dict(os.environ), result, t0, lambda: None)
    rec = result["sections"]["train_sweep"]
    assert rec["status"] == "resuming" and rec["resumed"] == 1 and rec["rows"]["b"]["status"] == "timeout"
    assert pending[0][0] == "train_sweep" and 20 < pending[0][1] < 30 and time.time() - t0 < 10
    assert device_check.run_group(args, pending, dict(os.environ), result, t0, lambda: None) == []
    rec = result["sections"]["train_sweep"]
    assert rec["status"] == "ok" and rec["seen"] == ["a", "b"] and list(rec["rows"]) == ["a", "b", "c"]
