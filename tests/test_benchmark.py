"""The benchmark runs end to end on a tiny shape (no timing assertions: figures come from scripts)."""

from __future__ import annotations

import json

from dd_jax import benchmark


def test_tiny_benchmark_against_torch_json(capsys):
    assert benchmark.main(["--preset", "tiny", "--height", "32", "--width", "32", "--txt", "8", "--steps", "1",
                           "--warmup", "0", "--lora-rank", "4", "--against-torch", "--json",
                           "--xla-variant", "xla_cpu_experimental_ynn_fusion_type="]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("train_step_ratio", "sample_step_ratio", "train_step_peak_fraction", "peak_flops"):
        assert r[key] > 0, key
    j, t = r["jax"], r["torch"]
    assert j["train_flops"] > 2 * j["sample_flops"] * 0.8 > 0  # forward + backward vs forward
    assert j["lora_params"] > 0 and t["lora_params"] > 0 and t["threads"] >= 1
    # the same architecture on both sides: base parameter counts agree
    assert abs(j["base_params"] - t["base_params"]) == 0
    assert "dd_jax (JAX)" in benchmark.table(r)
    # the two sides took turns, one step each
    assert r["timing"].startswith("alternating") and len(j["train_times"]) == len(t["train_times"]) == 1
    assert len(j["sample_times"]) == len(t["sample_times"]) == 1 and "steps" not in j
    # the XLA-options variant took its turn too, timed against ours with the default options
    (v,) = j["variants"]
    assert v["options"] == {"xla_cpu_experimental_ynn_fusion_type": ""} and "steps" not in v
    assert len(v["train_times"]) == len(v["sample_times"]) == 1
    assert v["train_ratio_to_default"] == v["train_step_s"] / j["train_step_s"] > 0
    assert "XLA options" in benchmark.table(r)
    # the CPU GEMM reference was sampled beside each timed train step
    assert len(j["gemm_flops"]) == 1 and r["peak_flops"] == j["gemm_flops"][0] > 0


def test_xla_variant_parsing_and_errors(capsys):
    assert benchmark.parse_xla_options("a=true,b=3,c=X,Y,d=") == {"a": True, "b": 3, "c": "X,Y", "d": ""}
    assert benchmark.main(["--preset", "tiny", "--xla-variant", "no_equals_sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert benchmark.main(["--preset", "tiny", "--xla-variant", "a=1", "--compile-only"]) == 2
    assert benchmark.main(["--preset", "tiny", "--steps", "0"]) == 2


def test_compile_only_reports_flops_and_memory(capsys):
    assert benchmark.main(["--preset", "tiny", "--height", "32", "--width", "32", "--txt", "8", "--scan",
                           "--remat", "proj", "--compile-only", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["jax"]["train_flops"] > 0 and "unscanned" in r["jax"]["flops_source"]
    assert r["jax"]["train_memory"]["argument_size_in_bytes"] > 0
    for name in ("train", "sample"):  # the optimized programs' op counts: the CPU-side evidence for a change
        hlo = r["jax"][f"{name}_hlo"]
        assert hlo["bytes_accessed"] > 0 and hlo["ops"]["fusion"] > 0 and hlo["kernels"] >= hlo["ops"]["fusion"]
        assert "parameter" not in hlo["ops"] and hlo["fused"]  # bookkeeping left out; fused bodies counted apart
    assert r["jax"]["train_hlo"]["kernels"] > r["jax"]["sample_hlo"]["kernels"]


def test_hlo_op_counts_split_top_level_from_fused():
    import jax
    import jax.numpy as jnp

    from dd_jax import hlo_stats

    def f(a, b):
        c = jnp.sin(a @ b) * 2.0 + 1.0  # the dot, then one elementwise fusion
        return c.T.copy(), jnp.concatenate([c, a[:, :3]], axis=1)

    x = jnp.ones((4, 6), jnp.float32)
    compiled = jax.jit(f).lower(x, jnp.ones((6, 3), jnp.float32)).compile()
    top, fused = hlo_stats.op_counts(compiled.as_text())
    assert top["parameter"] == 2 and sum(top.values()) > 2  # the entry's own instructions
    assert fused["sine"] >= 1 and top["sine"] == 0  # the sine lives inside fusion bodies (XLA may duplicate it)
    stats = hlo_stats.of(compiled)
    assert stats["flops"] >= 2 * 4 * 6 * 3 and stats["kernels"] == sum(stats["ops"].values()) > 0
    table = hlo_stats.compare({"a": stats, "b": {**stats, "flops": 2 * stats["flops"]}}, "a")
    assert "(2.00x)" in table and table.count("\n") == 3
