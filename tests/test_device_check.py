"""scripts/device_check.py: the --dry run (the same code at toy sizes on the CPU) writes every section ok,
imports nothing a GPU host lacks, and builds the same train step and optimizer as dd_jax.train."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import device_check  # noqa: E402


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
        assert rec["forbidden_modules_loaded"] == [], (name, rec["forbidden_modules_loaded"])
    assert sections["versions"]["device_kind"] and sections["versions"]["peak_bf16_flops"] is None  # CPU
    assert sections["correctness"]["pass"] and sections["correctness"]["lora_grad_tensors"] > 0
    for size in ("512x512", "512x1024"):
        t = sections[f"train_{size}"]
        assert t["loss_finite"] and t["step_s"] > 0 and t["compile_s"] > 0
        assert t["model_flops"] > t["model_flops_transformer"] > 0 and t["xla_memory"]["alias_size_in_bytes"] > 0
    assert sections["sample"]["finite"] and sections["sample"]["model_flops_per_step"] > 0
    assert any(k.startswith("L") for k in sections["attention"])
    assert result["summary"]["statuses"] == {k: "ok" for k in sections}


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
