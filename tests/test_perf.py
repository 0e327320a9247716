"""Analytic model FLOPs (dd_jax.perf) against XLA's count, and the device peak table.

XLA's cost analysis sees every matrix product when attention is "xla" and
nothing is rematerialised, so there the analytic count must agree with it:
within 5% counting the softmax's elementwise work (`with_softmax`), and the
model FLOPs alone within 2% from a flux-dev head dim (128) up, where the
remaining elementwise work is < 1%. Shapes are lowered, never run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dd_jax import lora, perf
from dd_jax.models import flux

S = jax.ShapeDtypeStruct
TINY = flux.PRESETS["tiny"]
# flux-dev's head dim (128), RoPE axes, embedders and mlp ratio; 3 heads, 1 + 2 blocks
SHRUNK = flux.FluxParams.from_dict({**flux.PRESETS["flux-dev"].to_dict(), "hidden_size": 384, "num_heads": 3,
                                    "depth": 1, "depth_single_blocks": 2})


def _xla_flops(p, batch, n, t, rank, train):
    def make():
        m = flux.Flux(p, rngs=nnx.Rngs(0))
        if rank:
            lora.apply_lora(m, rank, rank, rngs=nnx.Rngs(1))
        return m

    graphdef, lora_p, rest = nnx.split(nnx.eval_shape(make), nnx.LoRAParam, ...)
    f32 = jnp.float32
    args = (S((batch, n, p.in_channels), f32), S((n, 3), f32), S((batch, t, p.context_in_dim), f32), S((t, 3), f32),
            S((batch,), f32), S((batch, p.vec_in_dim), f32), S((batch,), f32))
    fwd = lambda lp, rest, *a: nnx.merge(graphdef, lp, rest)(*a)
    # LoRA-only backward: gradients w.r.t. the adapters alone, the base is a constant input
    fn = jax.grad(lambda lp, rest, *a: jnp.mean(jnp.square(fwd(lp, rest, *a)))) if train else fwd
    return perf.xla_flops(jax.jit(fn).trace(lora_p, rest, *args).lower())


CASES = [  # (params, batch, image tokens, text tokens, LoRA rank, train)
    ("tiny", TINY, 1, 192, 32, 0, False),
    ("tiny", TINY, 2, 192, 32, 8, True),
    ("shrunk", SHRUNK, 1, 96, 24, 0, False),
    ("shrunk", SHRUNK, 1, 96, 24, 16, False),
    ("shrunk", SHRUNK, 1, 192, 32, 16, True),
]


@pytest.mark.parametrize("name,p,batch,n,t,rank,train", CASES, ids=[
    f"{c[0]}-b{c[2]}-n{c[3]}-t{c[4]}-r{c[5]}-{'train' if c[6] else 'fwd'}" for c in CASES])
def test_analytic_flops_match_xla(name, p, batch, n, t, rank, train):
    ours = perf.flux_step_flops(p, batch=batch, img_tokens=n, txt_tokens=t, lora_rank=rank, train=train)
    xla = _xla_flops(p, batch, n, t, rank, train)
    assert abs(ours.with_softmax - xla) / xla < 0.05, (ours.as_dict(), xla)
    if name == "shrunk":
        assert abs(ours.total - xla) / xla < 0.02, (ours.total, xla)
    assert ours.total <= xla  # XLA also counts the elementwise work the model FLOPs leave out


def test_lora_backward_structure():
    """Backward of a LoRA-only step: base activation gradients ~1x the base forward (all but the first
    block's input projections and the vector path), LoRA and attention exactly 2x their forward."""
    p = flux.PRESETS["flux-dev"]
    f = perf.flux_step_flops(p, batch=1, img_tokens=3 * 1024, txt_tokens=512, lora_rank=128)
    assert f.attention_backward == 2 * f.attention_forward
    assert 0.9 * f.base_forward < f.base_backward < f.base_forward
    assert 1.9 * f.lora_forward < f.lora_backward < 2 * f.lora_forward
    fwd = perf.flux_step_flops(p, batch=1, img_tokens=3 * 1024, txt_tokens=512, lora_rank=128, train=False)
    assert fwd.backward == 0 and fwd.forward == f.forward
    # flux-dev at 512x512 ICD (3 layers of 1024 tokens + 512 text tokens): every token meets 6.45B
    # per-token weights (12 h^2 per block), 2 FLOPs each: 46.2 TFLOP of base projections forward
    assert abs(f.base_forward / (2 * 3584 * 57 * 12 * 3072**2) - 1) < 0.01
    assert 5e13 < f.forward < 7e13 and 1.1e14 < f.total < 1.4e14
    with pytest.raises(ValueError, match="lora_rank"):
        perf.flux_step_flops(p, batch=1, img_tokens=16, txt_tokens=8, lora_rank=0, train=True)


def test_modulation_targets_make_every_block_input_need_its_gradient():
    p = flux.FluxParams.from_dict({**TINY.to_dict(), "depth": 2, "depth_single_blocks": 1})
    plain = {x.path: x for x in perf.projections(p, 1, 16, 8, lora_targets=lora.DEFAULT_TARGETS)}
    assert not plain["double_blocks.0.img_attn.qkv"].needs_dx and plain["double_blocks.1.img_attn.qkv"].needs_dx
    assert plain["double_blocks.0.img_attn.proj"].needs_dx and not plain["double_blocks.0.img_mod.lin"].needs_dx
    assert plain["final_layer.linear"].needs_dx and not plain["img_in"].needs_dx
    mod = {x.path: x for x in perf.projections(p, 1, 16, 8, lora_targets=lora.MODULATION_TARGETS)}
    assert mod["double_blocks.0.img_attn.qkv"].needs_dx and not mod["double_blocks.0.img_mod.lin"].needs_dx
    only_single = {x.path: x for x in perf.projections(p, 1, 16, 8, lora_targets=(r"single_blocks\.\d+\.linear2",))}
    assert not any(only_single[k].needs_dx for k in only_single if k.startswith("double_blocks"))
    assert not only_single["single_blocks.0.linear1"].needs_dx and only_single["final_layer.linear"].needs_dx


# device_kind strings as JAX reports them
REAL_KINDS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H20": 148e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


@pytest.mark.parametrize("kind", sorted(REAL_KINDS))
def test_peak_table_resolves_real_device_kinds(kind):
    assert perf.peak_flops(kind) == REAL_KINDS[kind]


@pytest.mark.parametrize("kind", ["NVIDIA H20 ", "NVIDIA H200 NVL", "NVIDIA H100", "H200", "TPU v5p", "TPU v7",
                                  "NVIDIA GeForce RTX 4090", "cpu", "", None])
def test_unknown_device_has_no_peak(kind):
    if kind == "NVIDIA H20 ":  # surrounding blanks only: still the H20
        assert perf.peak_flops(kind) == 148e12
        return
    assert perf.peak_flops(kind) is None


def test_mfu_and_cpu_device():
    assert perf.mfu(1e12, 2.0, 1e12) == 0.5
    assert perf.mfu(1e12, 2.0, None) is None and perf.mfu(None, 2.0, 1e12) is None
    kind, peak = perf.device_peak(jax.devices("cpu")[0])
    assert peak is None and kind
