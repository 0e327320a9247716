"""Weight-only quantization of the frozen base (the Flux transformer's blocks, T5's blocks) with qwix.

`model.quantize` (configs/base.py) or `--quantize` (decompose, evaluate) is one of
- `int8`: one float32 scale per output column (absmax), a Linear's kernel stored as int8;
- `fp8`: the same scales, the kernel as float8_e4m3fn;
- `int4`: one scale per `INT4_TILE` input rows per output column (subchannel), the kernel as int4;
- `fp8_w8a8`: the kernel as `fp8` stores it, and the matmul's input too: each row (token) scaled by its own
  absmax into float8_e4m3fn as it arrives, so the product is a float8 x float8 matmul (the FP8 tensor cores
  of an H100/H200/H20: twice the bf16 rate), in the compute dtype. In QLoRA the input gradient is a float8
  matmul too (the cotangent's rows scaled the same way): both of the frozen base's GEMMs run in float8.
Otherwise activations stay in the compute dtype: each matmul dequantizes its kernel (`qwix.dot_general`: the
dequantize fuses into the matmul's operand) and multiplies in the compute dtype. LoRA parameters stay
float, so QLoRA trains exactly as LoRA does over a quantized base.

What is quantized: every Linear inside the transformer's double and single blocks (`FLUX_TARGETS`: the
attention and MLP projections and the modulations, 99% of flux-dev's weights) and inside T5's blocks
(`T5_TARGETS`). The embedders, the final layer, RMSNorm scales, T5's token embedding and the VAE stay in
their float dtype.

How it is stored: a quantized Linear's `kernel` becomes a `QKernel` module holding two `QuantizedParam`
Variables (`kernel.qvalue` [(layers,) in, out] and `kernel.scale`), with the kernel's logical axis names
(the scale's contracting axis unsharded), so they shard, split (`dd_jax.partition`) and count like any
parameter. `QuantizedParam` is an `nnx.Param`: the training step takes it as part of the frozen base, a
read-only input, and the optimizer (`wrt=nnx.LoRAParam`) never sees it. Its matmul has a hand-written
backward (`qmatmul`) that keeps only the quantized kernel, never a dequantized copy, for the input gradient.

How it is built (`dd_jax.system.build`): a converted checkpoint is quantized as it is read (`loader`, a
`convert` hook of `dd_jax.models.store`), so the float base is never whole on the device; LoRA is applied
over it, then `quantize_module` turns the kernels into `QKernel`s. A model trained in full (no LoRA, e.g.
the shipped model) has no frozen base at build time: `quantize_system` quantizes it after its weights are read.

Why not qwix's `quantize_model` / `PtqProvider`: they intercept `jax.lax.dot_general` during a first call
and replace the Params of the module they find on the Python stack; the Flux blocks here run as pure
functions of split states inside `jax.checkpoint` / `lax.scan` (`flux.Flux._run_stack`) and the steps merge
the model from flat arrays (`dd_jax.partition`), so the replacement would land on throwaway copies. The
storage (`qwix.QArray`), the quantizer (`qwix.quantize`) and the quantized matmul (`qwix.dot_general`) are
qwix's; only the placement in the module tree is ours.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import lora, optional
from dd_jax.models.layers import LOGICAL_AXES

if TYPE_CHECKING:
    import ml_collections
    from jax.typing import DTypeLike

QTYPES = ("int8", "fp8", "int4", "fp8_w8a8")
ACTIVATIONS_QUANTIZED = ("fp8_w8a8",)  # qtypes whose matmul also quantizes its input
INT4_TILE = 64  # int4: input rows per scale (the usual group size; flux-dev's widths are multiples of it)
FLUX_TARGETS: tuple[str, ...] = (r"double_blocks\..*", r"single_blocks\..*")
T5_TARGETS: tuple[str, ...] = (r"encoder\.block\..*",)
FEATURE = "--quantize (model.quantize)"


def qwix():
    """The qwix module, or one line naming it (`dd_jax.optional`)."""
    return optional.require("qwix", FEATURE)


def check(qtype: str | None) -> str:
    """The quantization a setting names: "" (none; also None and "none") or one of QTYPES."""
    q = (qtype or "").strip().lower()
    q = "" if q == "none" else q
    if q and q not in QTYPES:
        raise ValueError(f"quantize {qtype!r}: choose from {', '.join(QTYPES)} (or none)")
    return q


def storage_dtype(qtype: str) -> jnp.dtype:
    return {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn), "int4": jnp.dtype(jnp.int4),
            "fp8_w8a8": jnp.dtype(jnp.float8_e4m3fn)}[qtype]


def _tile(rows: int) -> int | None:
    for t in (INT4_TILE, 32, 16):
        if rows % t == 0 and rows > t:
            return t
    return None


def quantize_array(w: jax.Array | np.ndarray, qtype: str) -> Any:
    """A kernel [..., in, out] as a `qwix.QArray` with float32 scales: per output column (and per leading
    layer), int4 also per `INT4_TILE` input rows."""
    nd = np.ndim(w)
    contracting = nd - 2
    tiled = {}
    if qtype == "int4" and (t := _tile(np.shape(w)[contracting])):
        tiled = {contracting: t}
    channel = tuple(a for a in range(nd) if a != contracting)
    return qwix().quantize(jnp.asarray(w).astype(jnp.float32), storage_dtype(qtype), channelwise_axes=channel,
                           tiled_axes=tiled)


_quantize_jit = jax.jit(quantize_array, static_argnums=1)


def nbytes(tree: Any) -> int:
    """Bytes of a tree's arrays (abstract ones too), int4 counted as half a byte as XLA stores it."""
    bits = lambda d: 4 if jnp.dtype(d) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * jnp.dtype(d).itemsize
    return int(sum(x.size * bits(x.dtype) for x in jax.tree.leaves(tree)) // 8)


class QuantizedParam(nnx.Param):
    """The stored values or scales of a quantized kernel: part of the frozen base, never trained."""


@jax.custom_vjp
def qmatmul(x: jax.Array, qvalue: jax.Array, scale: jax.Array) -> jax.Array:
    """x [T, in] @ the kernel [in, out] that (qvalue, scale) store, in x's dtype (scale cast to it)."""
    q = qwix()
    return q.dot_general(x, q.QArray(qvalue, scale), (((1,), (0,)), ((), ())))


def _qmatmul_fwd(x, qvalue, scale):
    return qmatmul(x, qvalue, scale), (qvalue, scale)


def _qmatmul_bwd(res, g):
    qvalue, scale = res
    q = qwix()
    dx = q.dot_general(g, q.QArray(qvalue, scale), (((1,), (1,)), ((), ())))  # g [T, out] . kernel^T
    dq = (np.zeros(qvalue.shape, jax.dtypes.float0) if not jnp.issubdtype(qvalue.dtype, jnp.floating)
          else jnp.zeros_like(qvalue))
    return dx, dq, jnp.zeros_like(scale)


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


@jax.custom_vjp
def qmatmul_fp8(x: jax.Array, qvalue_t: jax.Array, scale_t: jax.Array) -> jax.Array:
    """x [T, in] @ the float8 kernel stored transposed (qvalue_t [out, in], scale_t [out, 1]) as a float8 x float8
    matmul: x's rows scaled by their own absmax into float8_e4m3fn (dynamic, per token), the product and both
    scales applied in x's dtype. x's cotangent is a float8 matmul as well (`_qmatmul_fp8_bwd`): in QLoRA both of
    the frozen base's GEMMs run in float8."""
    q = qwix()
    xq = q.quantize(x, jnp.float8_e4m3fn, channelwise_axes=(0,))
    return q.dot_general(xq, q.QArray(qvalue_t, scale_t), (((1,), (1,)), ((), ())), preferred_element_type=x.dtype)


def _qmatmul_fp8_fwd(x, qvalue_t, scale_t):
    return qmatmul_fp8(x, qvalue_t, scale_t), (qvalue_t, scale_t)


def _qmatmul_fp8_bwd(res, g):
    """x's cotangent as a float8 matmul too: dx = (g * scale) @ kernel^T, the column scales folded into g (they
    lie on the contracting axis), g's rows then scaled into float8_e4m3fn by their absmax (~2.6% error on a
    random matmul, where float8_e5m2 gives ~5%)."""
    qvalue_t, scale_t = res
    q = qwix()
    gq = q.quantize(g * jnp.swapaxes(scale_t, -1, -2).astype(g.dtype), jnp.float8_e4m3fn, channelwise_axes=(0,))
    dx = q.dot_general(gq, qvalue_t, (((1,), (0,)), ((), ())), preferred_element_type=g.dtype)
    return dx, jnp.zeros_like(qvalue_t), jnp.zeros_like(scale_t)


qmatmul_fp8.defvjp(_qmatmul_fp8_fwd, _qmatmul_fp8_bwd)


def _scale_axes(names: tuple | None) -> tuple | None:
    """The scale's logical axes: the kernel's, with its (tiled or reduced) contracting axis unsharded."""
    if not names:
        return None
    return tuple(None if i == len(names) - 2 else n for i, n in enumerate(names))


class QKernel(nnx.Module):
    """A Linear's kernel [(layers,) in, out] stored quantized: `qvalue` (int8 / float8 / int4) and float32
    `scale` ([(layers,) 1 or in / tile, out]), both `QuantizedParam`s. `qtype` (one of QTYPES) also says how
    it multiplies: `fp8_w8a8` quantizes the input too (`qmatmul_fp8`), and stores the kernel transposed,
    `qvalue` [(layers,) out, in] and `scale` [(layers,) out, 1]: a float8 matmul on Hopper wants both operands
    with the contracted axis innermost, and XLA would otherwise keep a transposed copy of every float8 kernel
    (4.4 of the flux-dev sampler's 15.5 GiB, XLA:GPU's memory analysis for an H100)."""

    def __init__(self, q: Any, logical_axes: tuple | None = None, qtype: str | None = None):
        stored = next(t for t in QTYPES if storage_dtype(t) == jnp.dtype(q.qvalue.dtype))
        if qtype is not None and storage_dtype(check(qtype)) != storage_dtype(stored):
            raise ValueError(f"a kernel stored as {jnp.dtype(q.qvalue.dtype).name} cannot multiply as {qtype}")
        self._qtype = qtype or stored
        qvalue, scale, names = q.qvalue, q.scale, tuple(logical_axes) if logical_axes else None
        snames = _scale_axes(names) if names else None
        if self._transposed:
            qvalue, scale = jnp.swapaxes(qvalue, -1, -2), jnp.swapaxes(scale, -1, -2)
            names = names and names[:-2] + (names[-1], names[-2])
            snames = snames and snames[:-2] + (snames[-1], snames[-2])
        self.qvalue = QuantizedParam(qvalue, **({LOGICAL_AXES: names} if names else {}))
        self.scale = QuantizedParam(scale, **({LOGICAL_AXES: snames} if snames else {}))

    @property
    def _transposed(self) -> bool:
        """Stored [(layers,) out, in] (fp8_w8a8)."""
        return self._qtype in ACTIVATIONS_QUANTIZED

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape, [(layers,) in, out], however it is stored."""
        shape = tuple(self.qvalue.shape)
        return shape[:-2] + (shape[-1], shape[-2]) if self._transposed else shape

    @property
    def qtype(self) -> str:
        return self._qtype

    def matmul(self, x: jax.Array, dtype: DTypeLike) -> jax.Array:
        """x [T, in] @ kernel -> [T, out] in `dtype` (the kernel dequantized to it inside the matmul; with
        `fp8_w8a8`, a float8 x float8 matmul)."""
        if self._transposed:
            return qmatmul_fp8(x.astype(dtype), self.qvalue[...], self.scale[...].astype(dtype))
        return qmatmul(x.astype(dtype), self.qvalue[...], self.scale[...].astype(dtype))

    def dequantize(self, dtype: DTypeLike = jnp.float32) -> jax.Array:
        """The kernel [(layers,) in, out] in `dtype`."""
        q = qwix()
        w = q.dequantize(q.QArray(self.qvalue[...], self.scale[...].astype(dtype)))
        return jnp.swapaxes(w, -1, -2) if self._transposed else w


class QLinear(nnx.Module):
    """An `nnx.Linear` whose kernel is a `QKernel` (bias and compute dtype kept)."""

    def __init__(self, base: nnx.Linear, kernel: QKernel):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel = kernel
        self.bias = base.bias
        self.dtype = base.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        lead = x.shape[:-1]
        y = self.kernel.matmul(x.reshape(-1, x.shape[-1]), dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y.reshape(lead + (self.out_features,))


def _path(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def _selected(path: str, targets: Sequence[str]) -> bool:
    return any(re.fullmatch(t, path) for t in targets)


def quantize_module(module: nnx.Module, qtype: str, targets: Sequence[str]) -> list[str]:
    """Stores the kernel of every Linear (`nnx.Linear`, `lora.LoRALinear`) whose path matches `targets` as a
    `QKernel`, in place (kernels a `loader` already quantized are adopted as they are); plain Linears
    become `QLinear`s, LoRA layers keep their float adapters. Returns the paths quantized. Works inside
    `nnx.eval_shape` too (abstract shapes, nothing allocated)."""
    qtype = check(qtype)
    if not qtype:
        return []
    q = qwix()
    found = [(tuple(p), n) for p, n in nnx.iter_graph(module)
             if isinstance(n, (nnx.Linear, lora.LoRALinear)) and not isinstance(n.kernel, QKernel)
             and _selected(_path(p), targets)]
    for path, node in found:
        value = node.kernel.get_value()
        qa = value if isinstance(value, q.QArray) else quantize_array(value, qtype)
        kernel = QKernel(qa, node.kernel.get_metadata().get(LOGICAL_AXES), qtype)
        if isinstance(node, lora.LoRALinear):
            node.kernel = kernel
        else:
            lora.replace_submodule(module, path, QLinear(node, kernel))
    return [_path(p) for p, _ in found]


def quantized_paths(module: nnx.Module) -> list[str]:
    """Paths of the Linears whose kernels are stored quantized."""
    return [_path(p) for p, n in nnx.iter_graph(module) if isinstance(n, QKernel)]


def _place(q: Any, sharding: Any) -> Any:
    """A QArray on the device(s): qvalue with the kernel's sharding, the scale with its contracting axis whole."""
    if sharding is None:
        return q
    ssharding = sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) >= 2:
        spec = list(sharding.spec) + [None] * (q.qvalue.ndim - len(sharding.spec))
        spec[-2] = None
        ssharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return q.replace(qvalue=jax.device_put(q.qvalue, sharding), scale=jax.device_put(q.scale, ssharding))


def loader(qtype: str, targets: Sequence[str]) -> Callable[[str, Any, Any], Any] | None:
    """A `convert` hook for `flux.load` / `t5.load`: every Linear kernel under `targets` is quantized as it
    is read (a stacked one layer by layer), so only one module's float weights are ever on the device.
    Quantize the module afterwards with `quantize_module` (which adopts these kernels)."""
    qtype = check(qtype)
    if not qtype:
        return None
    qwix()  # fail before reading anything

    def convert(path: str, arr: Any, sharding: Any) -> Any:
        module, _, leaf = path.rpartition(".")
        if leaf != "kernel" or np.ndim(arr) < 2 or not _selected(module, targets):
            return None
        if np.ndim(arr) == 2:
            qa = _quantize_jit(arr, qtype)
        else:  # stacked [layers, in, out]: one layer at a time, then stacked (the same scales as all at once)
            parts = [_quantize_jit(arr[i], qtype) for i in range(arr.shape[0])]
            qa = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        return _place(qa, sharding)

    return convert


def load_t5(path: str, qtype: str = "", dtype: DTypeLike | None = None) -> nnx.Module:
    """A converted T5 encoder folder, its blocks' Linears quantized as they are read (`qtype` "": float)."""
    from dd_jax.models import t5

    model = t5.load(path, dtype, convert=loader(qtype, T5_TARGETS))
    quantize_module(model, qtype, T5_TARGETS)
    return model


# ------------------------------------------------------------------ which quantization a build uses
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dd_jax_quantize", default=None)


@contextlib.contextmanager
def requested(qtype: str | None) -> Iterator[None]:
    """Within the block, builds (`dd_jax.system.build`) use `qtype` instead of the config's model.quantize
    (None: the config's). A model trained in full is then left float by the build, to be quantized after its
    weights are read (`quantize_system`)."""
    token = _OVERRIDE.set(None if qtype is None else check(qtype))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def configured(config: ml_collections.ConfigDict) -> str:
    """The quantization a build uses: `requested`'s, else the config's model.quantize."""
    override = _OVERRIDE.get()
    return override if override is not None else check(config.model.get("quantize", ""))


def overridden() -> bool:
    return _OVERRIDE.get() is not None


def quantize_system(system: Any) -> Any:
    """Quantizes what the build left float of a `dd_jax.system.System`'s transformer as its config (or
    `requested`) says: a model trained in full, once its weights are read; a LoRA model's base was
    quantized as it loaded (nothing left to do). Returns the system. Decompose and evaluate load with

        with quantize.requested(qtype):
            system = dd_jax.system.for_sampling(checkpoints.load_trained(path, config))

    (`for_sampling` calls this, then merges LoRA into a float base.)
    """
    q = configured(system.config)
    if q and quantize_module(system.model.transformer, q, FLUX_TARGETS):
        from dd_jax import sampling

        sampling.forget(system.model.transformer)  # its structure changed
    return system
