"""Conversion plans: how each parameter of our model is made from checkpoint tensors.

A plan maps every flat parameter path of the target NNX model to a `Rule`:
the source tensor names, the shape each source must have, and a function that
builds our array from them (transpose, concatenation, half swap). Plans are
checked against a checkpoint's header before a byte of data is read, so a
missing, unexpected or wrongly shaped tensor fails at once with its name and
both shapes; then `stream` reads and converts one group at a time.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from dd_jax.models import store
from weights_conversion.safetensors_reader import CheckpointError, SafetensorsReader

if TYPE_CHECKING:
    import numpy.typing as npt

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    shapes: tuple[Shape, ...]
    fn: Callable[[Sequence[np.ndarray]], np.ndarray]


def _linear_kernel(ws: Sequence[np.ndarray]) -> np.ndarray:
    """torch Linear weights [out, in] (concatenated along out) -> flax kernel [in, out]."""
    w = ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)
    return np.ascontiguousarray(w.T)


def _concat(ws: Sequence[np.ndarray]) -> np.ndarray:
    return ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)


def _swap_halves(fn):
    def swapped(ws):
        out = fn(ws)
        axis = out.ndim - 1  # the output dim: last for kernels, only for biases
        a, b = np.split(out, 2, axis=axis)
        return np.ascontiguousarray(np.concatenate([b, a], axis=axis))

    return swapped


def linear_rules(target: str, shape: Shape, sources: Sequence[str], split: Sequence[int] | None = None,
                 swap: bool = False, weight: str = "weight") -> dict[str, Rule]:
    """Rules for one Linear: `target.kernel` [in, out] and `target.bias` [out].

    `sources` are torch module names whose weights are concatenated along the
    output dim, with output sizes `split` (default: equal parts).
    """
    din, dout = shape
    split = list(split) if split is not None else [dout // len(sources)] * len(sources)
    if sum(split) != dout or len(split) != len(sources):
        raise ValueError(f"{target}: parts {split} do not split {dout} outputs over {len(sources)} sources")
    kfn, bfn = _linear_kernel, _concat
    if swap:
        kfn, bfn = _swap_halves(kfn), _swap_halves(bfn)
    return {
        f"{target}.kernel": Rule(tuple(f"{s}.{weight}" for s in sources), tuple((n, din) for n in split), kfn),
        f"{target}.bias": Rule(tuple(f"{s}.bias" for s in sources), tuple((n,) for n in split), bfn),
    }


def _conv_kernel(ws: Sequence[np.ndarray]) -> np.ndarray:
    """torch conv weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O]."""
    return np.ascontiguousarray(ws[0].transpose(2, 3, 1, 0))


def conv_rules(target: str, shape: Shape, source: str, bias: bool = True) -> dict[str, Rule]:
    """Rules for one Conv2d: `target.kernel` [kh, kw, in, out] (and `target.bias` [out]) from torch `source`."""
    kh, kw, cin, cout = shape
    rules = {f"{target}.kernel": Rule((f"{source}.weight",), ((cout, cin, kh, kw),), _conv_kernel)}
    if bias:
        rules[f"{target}.bias"] = Rule((f"{source}.bias",), ((cout,),), _concat)
    return rules


def copy_rule(source: str, shape: Shape) -> Rule:
    return Rule((source,), (tuple(shape),), _concat)


def check(plan: Mapping[str, Rule], reader: SafetensorsReader, ignore: Iterable[str] = ()) -> None:
    """Fails with one clear error if the checkpoint does not match the plan."""
    expected: dict[str, Shape] = {}
    for rule in plan.values():
        for name, shape in zip(rule.sources, rule.shapes):
            expected[name] = tuple(shape)
    present = reader.shapes()
    ignore = set(ignore)
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected and k not in ignore]
    wrong = [(k, expected[k], present[k]) for k in expected if k in present and tuple(present[k]) != expected[k]]
    problems = []
    for k in missing[:5]:
        problems.append(f"missing key {k!r} (expected shape {expected[k]})")
    for k in unexpected[:5]:
        problems.append(f"unexpected key {k!r} (shape {tuple(present[k])})")
    for k, want, got in wrong[:5]:
        problems.append(f"wrong shape for {k!r}: expected {want}, found {tuple(got)}")
    if problems:
        more = len(missing) + len(unexpected) + len(wrong) - len(problems)
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems)
                              + (f"; and {more} more problem(s)" if more > 0 else ""))


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _check_finite(a: np.ndarray, what: str, allow: bool, cast: bool = False) -> None:
    """CheckpointError (one line, `what` names the tensor) if `a` holds NaN or inf; a warning line if `allow`."""
    if not _is_float(a.dtype) or np.isfinite(a).all():
        return
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    why = ("values beyond the range of that dtype; convert with --dtype float32 or bfloat16" if cast
           else "a damaged or diverged checkpoint; download it again")
    if not allow:
        raise CheckpointError(f"{what} holds {bad} NaN or inf value(s) of {a.size} ({why}, or pass "
                              f"--allow-non-finite to convert it as it is); its model folder was not written")
    print(f"warning: {what} holds {bad} NaN or inf value(s) of {a.size}; converted as it is (--allow-non-finite)",
          file=sys.stderr, flush=True)


def stream(plan: Mapping[str, Rule], reader: SafetensorsReader, writer: store.GroupedWriter, dtype: npt.DTypeLike,
           group_fn: Callable[[str], str] = store.module_group, progress: bool = True,
           allow_non_finite: bool = False) -> None:
    """Converts group by group (by default one module each): one group's arrays are alive at a time.

    Every tensor read, and every converted array, is checked for NaN and inf: CheckpointError naming the tensor
    (a damaged download; a cast to a narrower dtype that overflows), unless `allow_non_finite`, which converts
    them as they are with a warning line per tensor."""
    groups: dict[str, list[str]] = {}
    for target in plan:
        groups.setdefault(group_fn(target), []).append(target)
    dtype = np.dtype(dtype)
    t0, done_bytes = time.time(), 0
    names = list(groups)
    for i, group in enumerate(names):
        arrays = {}
        for target in groups[group]:
            rule = plan[target]
            parts = [reader.read(s) for s in rule.sources]
            for s, p in zip(rule.sources, parts):
                _check_finite(p, f"tensor {s!r} of {reader.info(s).path}", allow_non_finite)
            with np.errstate(over="ignore"):  # a cast that overflows is named by the check below, in one line
                # Cast before combining when that shrinks the data (e.g. float32 -> bfloat16).
                if all(p.dtype.itemsize > dtype.itemsize for p in parts):
                    parts = [p.astype(dtype) for p in parts]
                arrays[target] = rule.fn(parts).astype(dtype, copy=False)
            del parts
            _check_finite(arrays[target], f"parameter {target!r} (from {', '.join(map(repr, rule.sources))}) cast "
                                          f"to {dtype.name}", allow_non_finite, cast=True)
        writer.write_group(group, arrays)
        done_bytes += sum(a.nbytes for a in arrays.values())
        del arrays
        # one progress line per block (or top-level module), not per group
        last_of_block = i + 1 == len(names) or store.default_group(names[i + 1]) != store.default_group(group)
        if progress and last_of_block:
            print(f"  [{i + 1}/{len(names)}] {store.default_group(group)}: {done_bytes / 2**30:.2f} GiB written "
                  f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
