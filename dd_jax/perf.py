"""Model FLOPs of the Flux MMDiT (+ LoRA) per step, counted analytically, and device peaks for MFU.

XLA's cost analysis cannot be the MFU numerator: it counts a custom call
(cuDNN flash attention, a Pallas/Mosaic kernel) as 0 FLOPs, so with a fused
kernel the step looks ~25% cheaper than it is, and it counts remat
recomputation that is not model work. This module counts the model's
matrix products from the architecture; `tests/test_perf.py` checks the count
against XLA's where XLA sees every product (attention "xla", no remat).

Notation: B batch, N image tokens (all ICD layers), T text tokens,
L = N + T, h hidden size, m = mlp_ratio * h, H heads of dim d (H * d = h),
r LoRA rank. A matrix product of R rows by an [in, out] weight is 2*R*in*out
FLOPs (one multiply + one add per term).

Forward, per example:
- per image token: img_in 2*in_channels*h, final_layer.linear 2*h*out_channels;
  per text token: txt_in 2*context_in_dim*h;
- per token of each stream, per double block: qkv 2*h*3h + proj 2*h*h + mlp 2*h*m*2
  = 2h(4h + 2m) (= 24 h^2 at mlp_ratio 4);
- per token (joint sequence), per single block: linear1 2*h*(3h + m) + linear2
  2*(h + m)*h = 2h(4h + 2m), the same;
- attention, per block (19 double + 38 single), both streams joint:
  QK^T 2*L^2*d and PV 2*L^2*d per head, summed over heads: 4*L^2*h;
- per example (the conditioning vector): time_in 2(256h + h^2), guidance_in the same,
  vector_in 2(vec_in_dim*h + h^2), modulations 2*h*6h per double-block stream,
  2*h*3h per single block, final adaLN 2*h*2h; all of these twice with
  `cond_t0` (the condition tokens' timestep-0 vector);
- LoRA, per adapted projection of R rows: x@A 2*R*in*r + (xA)@B 2*R*r*out
  = 2Rr(in + out).

Backward for LoRA-only training (the frozen base needs activation
gradients, never weight gradients):
- base: dx = dy @ W^T, 2*R*in*out, for every projection whose input depends
  on the LoRA parameters: every block projection except the first block's
  input projections (double block 0's qkv, both streams: their input is the
  embedded data), and final_layer.linear; not the embedders or the
  modulations (their inputs are data and the conditioning vector);
  about 1x the base forward;
- LoRA: g = dy @ B^T 2Rr*out, dB = (xA)^T @ dy 2Rr*out, dA = x^T @ g 2Rr*in,
  and dx += g @ A^T 2Rr*in where dx is needed: 4Rr(in + out), 2x the LoRA
  forward;
- attention: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 8*L^2*h per
  block, 2x its forward. A flash kernel recomputes QK^T in its backward: that
  is hardware work, not model work, and is not counted (nor is remat).

So a LoRA train step is ~2x the forward (1x forward + ~1x backward of the
frozen base, dominated by the projections) plus 2x for attention and LoRA.
Not counted in the model FLOPs: elementwise work (norms, RoPE, GELU,
modulation, softmax, the optimizer). The softmax's is given separately
(`softmax_*`: 5 FLOPs per score forward -- scale, max, subtract, sum,
divide; exp is a transcendental -- and 3 backward), because at small head
dims it is a visible part of XLA's count; the rest is < 3% of XLA's count at
hidden 64 and < 1% from hidden 384 up.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

    from dd_jax.models.flux import FluxParams

# Dense bf16 (no sparsity) peak FLOP/s per device, keyed by the exact `jax.Device.device_kind` string.
# Public figures: NVIDIA H100/H200/H20/A100 datasheets, Google Cloud TPU system architecture pages.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H20": 148e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops(device_kind: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind (exact match, surrounding blanks ignored); None = unknown.

    No substring or prefix matching: "NVIDIA H20" must not score an H200, nor "TPU v5" a v5e."""
    if not device_kind:
        return None
    return PEAK_BF16_FLOPS.get(" ".join(str(device_kind).split()))


def device_peak(device: jax.Device | None = None) -> tuple[str, float | None]:
    """(device_kind, peak FLOP/s or None) of a jax device (default: the first)."""
    if device is None:
        import jax  # not at import: dd_jax.benchmark imports this module before JAX may start (dd_jax.hostmem)

        device = jax.devices()[0]
    kind = getattr(device, "device_kind", "") or device.platform
    return kind, peak_flops(kind) if device.platform != "cpu" else None


def mfu(model_flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    """Model-FLOP utilisation: model FLOPs per second over the peak; None where anything is unknown."""
    if not model_flops or not seconds or not peak:
        return None
    return model_flops / seconds / peak


@dataclasses.dataclass(frozen=True)
class Projection:
    path: str  # BFL module path (per block: double_blocks.<i>.img_attn.qkv)
    rows: int  # rows the weight multiplies per step (tokens x batch, or batch for the vector)
    din: int
    dout: int
    needs_dx: bool  # whether the LoRA-only backward needs the gradient w.r.t. its input


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step; `forward`/`backward` are model FLOPs (matrix products only)."""

    base_forward: float  # frozen projections
    lora_forward: float
    attention_forward: float  # QK^T and PV
    base_backward: float  # activation gradients through the frozen projections
    lora_backward: float
    attention_backward: float
    softmax_forward: float  # elementwise, not model FLOPs (see module doc)
    softmax_backward: float

    @property
    def forward(self) -> float:
        return self.base_forward + self.lora_forward + self.attention_forward

    @property
    def backward(self) -> float:
        return self.base_backward + self.lora_backward + self.attention_backward

    @property
    def total(self) -> float:
        """The model FLOPs of the step (forward + backward): the MFU numerator."""
        return self.forward + self.backward

    @property
    def with_softmax(self) -> float:
        """total + the softmax's elementwise work: what XLA's count should come close to."""
        return self.total + self.softmax_forward + self.softmax_backward

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d.update(forward=self.forward, backward=self.backward, total=self.total)
        return d


def _adapted(path: str, targets: Iterable[str]) -> bool:
    return any(re.fullmatch(t, path) for t in targets)


def projections(params: FluxParams, batch: int, img_tokens: int, txt_tokens: int, cond_t0: bool = False,
                lora_targets: Sequence[str] = ()) -> list[Projection]:
    """Every weight matrix of the Flux forward, with its rows per step, in execution order.

    `needs_dx` follows the data flow: a projection's input depends on the LoRA parameters
    (`lora_targets`) once an adapted projection lies upstream of it in its stream (both streams
    after a joint attention that saw one)."""
    p, b, n, t = params, int(batch), int(img_tokens), int(txt_tokens)
    h, m = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    lo = lambda path: bool(lora_targets) and _adapted(path, lora_targets)
    vec = b * (2 if cond_t0 else 1)  # rows of the conditioning-vector projections
    out = [Projection("img_in", b * n, p.in_channels, h, False),
           Projection("txt_in", b * t, p.context_in_dim, h, False)]
    embedders = ([("time_in", 256)] + ([("guidance_in", 256)] if p.guidance_embed else [])
                 + [("vector_in", p.vec_in_dim)])
    for name, din in embedders:  # inputs: timesteps, guidance, pooled text -- never LoRA-dependent
        out += [Projection(f"{name}.in_layer", vec, din, h, False), Projection(f"{name}.out_layer", vec, h, h, False)]
    dirty = {"img": False, "txt": False}  # does the stream's residual depend on the LoRA parameters?
    for i in range(p.depth):
        rows = {"img": b * n, "txt": b * t}
        path = lambda s, name: f"double_blocks.{i}.{s}_{name}"
        mod = {s: lo(path(s, "mod.lin")) for s in dirty}
        attn = any(dirty[s] or mod[s] or lo(path(s, "attn.qkv")) for s in dirty)  # joint attention's output
        for s in ("img", "txt"):
            mod_rows = vec if s == "img" else b  # only the image stream's modulation sees the condition vector
            after_attn = dirty[s] or mod[s] or attn or lo(path(s, "attn.proj"))
            out += [Projection(path(s, "mod.lin"), mod_rows, h, 6 * h, False),
                    Projection(path(s, "attn.qkv"), rows[s], h, 3 * h, dirty[s] or mod[s]),
                    Projection(path(s, "attn.proj"), rows[s], h, h, attn),
                    Projection(path(s, "mlp.0"), rows[s], h, m, after_attn),
                    Projection(path(s, "mlp.2"), rows[s], m, h, after_attn or lo(path(s, "mlp.0")))]
            dirty[s] = after_attn or lo(path(s, "mlp.0")) or lo(path(s, "mlp.2"))
    x = any(dirty.values())
    for i in range(p.depth_single_blocks):
        path = lambda name: f"single_blocks.{i}.{name}"
        x = x or lo(path("modulation.lin"))
        out += [Projection(path("modulation.lin"), vec, h, 3 * h, False),
                Projection(path("linear1"), b * (n + t), h, 3 * h + m, x),
                Projection(path("linear2"), b * (n + t), h + m, h, x or lo(path("linear1")))]
        x = x or lo(path("linear1")) or lo(path("linear2"))
    out += [Projection("final_layer.adaLN_modulation.1", vec, h, 2 * h, False),
            Projection("final_layer.linear", b * n, h, p.out_channels, x or lo("final_layer.adaLN_modulation.1"))]
    return out


def flux_step_flops(params: FluxParams, *, batch: int, img_tokens: int, txt_tokens: int, lora_rank: int = 0,
                    lora_targets: Sequence[str] | None = None, train: bool = True,
                    cond_t0: bool = False) -> StepFlops:
    """FLOPs of one Flux forward (`train=False`, e.g. a sampling step) or one LoRA-only train step.

    `lora_targets`: regexes over the BFL paths (default `dd_jax.lora.DEFAULT_TARGETS`), as
    `lora.apply_lora` matches them; rank 0 = no LoRA. Training needs LoRA (the frozen base has
    no gradients of its own). `img_tokens` counts every ICD layer's tokens.
    """
    if lora_targets is None:
        from dd_jax.lora import DEFAULT_TARGETS  # as jax above: dd_jax.lora imports JAX

        lora_targets = DEFAULT_TARGETS
    r = int(lora_rank)
    if train and r <= 0:
        raise ValueError("a LoRA-only train step needs lora_rank > 0")
    base_f = lora_f = base_b = lora_b = 0.0
    for pr in projections(params, batch, img_tokens, txt_tokens, cond_t0, lora_targets if r > 0 else ()):
        base_f += 2.0 * pr.rows * pr.din * pr.dout
        adapted = r > 0 and _adapted(pr.path, lora_targets)
        if adapted:
            lora_f += 2.0 * pr.rows * r * (pr.din + pr.dout)
        if not train:
            continue
        if pr.needs_dx:
            base_b += 2.0 * pr.rows * pr.din * pr.dout
        if adapted:
            lora_b += 2.0 * pr.rows * r * (2 * pr.dout + pr.din + (pr.din if pr.needs_dx else 0))
    seq = int(img_tokens) + int(txt_tokens)
    blocks = params.depth + params.depth_single_blocks
    scores = float(batch) * params.num_heads * seq * seq * blocks  # attention scores per step
    attn_f = 4.0 * batch * seq * seq * params.hidden_size * blocks
    return StepFlops(base_forward=base_f, lora_forward=lora_f, attention_forward=attn_f,
                     base_backward=base_b, lora_backward=lora_b, attention_backward=2 * attn_f if train else 0.0,
                     softmax_forward=5.0 * scores, softmax_backward=3.0 * scores if train else 0.0)


def xla_flops(lowered_or_compiled: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """XLA's FLOP count of a Lowered or Compiled (None where it gives none)."""
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
