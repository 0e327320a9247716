"""Ahead-of-time lowering of the production train step and sampler for the target platforms, on this CPU.

The model's platform is an explicit input (`model.platform`), so the code is traced here for another
backend and lowered with `lowering_platforms`. Shrunk flux-dev width (flux-dev's head dim 128, RoPE axes,
embedders and text widths; hidden 256, 1 + 1 blocks), bf16, LoRA r8, the Flux VAE (tiny preset) in the
step, cached text. What each lowered module must contain:

- cuda, attention "xla": no attention kernel (plain dots);
- cuda, attention "cudnn": cuDNN's fused attention custom calls (`__cudnn$fmhaSoftmax` forward,
  `__cudnn$fmhaSoftmaxBackward` in the train step);
- tpu, attention "splash", FSDP over 8 host devices (a child process: XLA_FLAGS forces 8 CPU devices):
  the Mosaic kernels (`tpu_custom_call`, forward and backward) and sharded parameters;
- the train step donates exactly its trainable + optimizer state: those inputs carry
  `tf.aliasing_output` (or `jax.buffer_donor`), the frozen base none, and the step returns no base
  array; the sampler donates nothing and returns the target layers only;
- no float64 anywhere.

Where the cuDNN lowering stops without the CUDA plugin: `jax.nn.dot_product_attention(implementation=
"cudnn")` calls `jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version()`, which asks the CUDA
plugin's `cuda_versions` module for the cuDNN version and raises "cuDNN is not detected." when the
plugin is absent (this machine). `test_cudnn_lowering_stops_at_the_version_check` pins exactly that; the
cuDNN tests then substitute a version (9.10.0, through pytest's monkeypatch, for that one function and
only inside the test) and lower the whole step. Nothing else in JAX is touched; with the plugin
installed the real check runs.
"""

from __future__ import annotations

import json
import os
import re
import sys

import host_devices
import pytest

pytestmark = pytest.mark.matrix  # also run on the Python 3.12 leg of .ci/run

TXT = 16
H = W = 64  # 4x4 tokens per layer through the tiny VAE (8x) and 2x2 packing


def _config(platform: str, attention: str, remat: str = "proj"):
    from configs import base

    c = base.get_config()
    c.model.preset = "flux-dev"
    c.model.params = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)
    c.model.param_dtype = c.model.compute_dtype = "bfloat16"
    c.model.attention = attention
    c.model.platform = platform
    c.model.scan_layers = True
    c.model.remat = remat
    c.lora.rank, c.lora.alpha = 8, 8.0
    c.autoencoder.kind, c.autoencoder.preset = "flux", "tiny"
    c.text.kind = "precomputed"
    c.data.height, c.data.width, c.data.batch_size = H, W, 1
    return c


def _lower(platform: str, attention: str, mesh=None, batch_size: int = 1, remat: str = "proj") -> dict:
    """Lowered texts and partition facts of the production train step and sampler (abstract shapes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dd_jax import aot, flow, lora, sampling, sharding, system as system_lib

    config = _config(platform, attention, remat)
    config.data.batch_size = batch_size

    def init():
        model = system_lib.build_model(config, load_weights=False)
        return model, flow.system_optimizer(system_lib.wrap(model, config))

    model, optimizer = nnx.eval_shape(init)
    batch = aot.abstract_batch(config, txt_len=TXT)
    if mesh is not None:  # FSDP: every abstract array carries its sharding; activations are constrained
        rules = sharding.resolve_rules()
        for node in (model, optimizer):
            for _, var in nnx.iter_graph(node):
                if isinstance(var, nnx.Variable) and hasattr(var.get_value(), "shape"):
                    a = var.get_value()
                    var.set_value(jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=sharding.variable_sharding(var, mesh, rules)))
        act = sharding.ActivationSharding(mesh, tuple(sorted(rules.items())))
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "activation_sharding"):
                node.activation_sharding = act
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, ndim=len(v.shape)))
                 for k, v in batch.items()}
    system = system_lib.wrap(model, config)
    step = flow.system_step(system)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    train_text = step.lower(model, optimizer, batch, key, platforms=(platform,)).as_text()
    parts = step.partition_bytes(model, optimizer)

    h, w = system.grid(H, W)
    p = model.transformer.params
    cond = jax.ShapeDtypeStruct((batch_size, h * w, p.in_channels), jnp.float32)
    txt = jax.ShapeDtypeStruct((batch_size, TXT, p.context_in_dim), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((batch_size, p.vec_in_dim), jnp.bfloat16)
    sample_text = sampling.lower_sample(model.transformer, system.spec, cond, txt, vec, key, (h, w), 2,
                                        system.guidance, platforms=(platform,), **system.output_reading()).as_text()
    n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    n_opt = len(jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
    return {"train": train_text, "sample": sample_text, "parts": parts, "n_lora": n_lora, "n_opt": n_opt,
            "lora_layers": len(lora.lora_layers(model))}


def _main_signature(text: str) -> tuple[list[str], str]:
    """The public main function's argument attribute strings and its result types."""
    m = re.search(r"func\.func public @main\((.*?)\)\s*->\s*\((.*?)\)\s*\{", text, re.S)
    assert m, "no public @main in the lowered module"
    args = re.split(r",\s*(?=%arg\d+:)", m.group(1))
    return args, m.group(2)


def _check_common(low: dict) -> None:
    train_text, sample_text = low["train"], low["sample"]
    for name, text in (("train", train_text), ("sample", sample_text)):
        assert not re.search(r"\bf64\b", text), f"float64 in the lowered {name} step"
    args, results = _main_signature(train_text)
    donated = [a for a in args if "tf.aliasing_output" in a or "jax.buffer_donor" in a]
    # trainable (LoRA) and optimizer state donated (the key and batch are not), the frozen base not
    assert len(donated) == low["n_lora"] + low["n_opt"], (len(donated), low["n_lora"], low["n_opt"])
    assert len(args) > len(donated) + 10  # the frozen base: read-only inputs
    assert low["parts"]["frozen"] > 10 * (low["parts"]["trainable"])
    # results: trainable + optimizer state + loss + grad norm (no frozen array comes back)
    assert results.count("tensor<") == low["n_lora"] + low["n_opt"] + 2, results
    s_args, s_results = _main_signature(sample_text)
    assert not any("tf.aliasing_output" in a or "jax.buffer_donor" in a for a in s_args)
    assert s_results.count("tensor<") == 2  # the two target layers (x, y), nothing of the transformer


def _cuda_plugin_present() -> bool:
    from jax._src.lib import cuda_versions

    return cuda_versions is not None


@pytest.fixture
def cudnn_version(monkeypatch):
    """Without the CUDA plugin, stand in for JAX's cuDNN version query (see the module doc)."""
    if not _cuda_plugin_present():
        from jax._src.cudnn import fused_attention_stablehlo

        monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def test_cudnn_lowering_stops_at_the_version_check():
    if _cuda_plugin_present():
        pytest.skip("the CUDA plugin is installed: the real cuDNN version check passes")
    with pytest.raises(RuntimeError, match="cuDNN is not detected") as info:
        _lower("cuda", "cudnn")
    assert any(e.name == "check_cudnn_version" for e in info.traceback)


def test_cuda_xla_attention():
    low = _lower("cuda", "xla")
    _check_common(low)
    for text in (low["train"], low["sample"]):
        assert "__cudnn$fmha" not in text and "tpu_custom_call" not in text


def test_cuda_cudnn_attention(cudnn_version):
    low = _lower("cuda", "cudnn")
    _check_common(low)
    # 1 double + 1 single block: forward kernels in both programs, backward kernels in the train step; remat
    # "proj" runs each block's attention forward again in the backward pass (4 forward calls for 2 blocks)
    assert low["train"].count("@__cudnn$fmhaSoftmax(") == 4 and low["train"].count("@__cudnn$fmhaSoftmaxBackward(") == 2
    assert low["sample"].count("@__cudnn$fmhaSoftmax(") >= 2 and "Backward" not in low["sample"]
    assert "tpu_custom_call" not in low["train"]


def test_cuda_cudnn_attention_proj_attn_policy_keeps_the_forward(cudnn_version):
    """Remat "proj_attn" saves the cuDNN forward's outputs: one attention forward a block, none recomputed."""
    low = _lower("cuda", "cudnn", remat="proj_attn")
    assert low["train"].count("@__cudnn$fmhaSoftmax(") == 2 and low["train"].count("@__cudnn$fmhaSoftmaxBackward(") == 2


def _tpu_worker() -> dict:
    import jax

    from dd_jax import sharding

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with jax.set_mesh(mesh):
        low = _lower("tpu", "splash", mesh=mesh, batch_size=8)
    _check_common(low)
    train_text, sample_text = low["train"], low["sample"]
    args, _ = _main_signature(train_text)
    kernels = lambda text: sorted(set(re.findall(r'kernel_name = "([^"]+)"', text))) \
        if "tpu_custom_call" in text else []
    return {"train_kernels": kernels(train_text), "sample_kernels": kernels(sample_text),
            "sharded_args": sum(bool(re.search(r'(sdy\.sharding = .*"fsdp")|(mhlo\.sharding = "\{devices=\[)', a))
                                for a in args), "args": len(args), "arg_example": args[len(args) // 2][:400],
            "num_partitions": "mhlo.num_partitions = 8" in train_text,
            "cudnn": "__cudnn$fmha" in train_text}


def test_tpu_splash_fsdp8():
    out = host_devices.run_with_8_devices(__file__)
    # Mosaic splash kernels: forward in both programs, dq and dkv backward kernels in the train step
    assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
            "splash_mha_dkv_segmented_no_residuals"} <= set(out["train_kernels"]), out
    assert out["sample_kernels"] and all("fwd" in k for k in out["sample_kernels"]), out
    assert out["num_partitions"] and out["sharded_args"] > out["args"] // 4, out  # (biases, norms, counts: whole)
    assert not out["cudnn"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    print(json.dumps(_tpu_worker()))
