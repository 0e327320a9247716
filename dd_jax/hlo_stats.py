"""What a compiled program does, read off XLA's optimized HLO and its cost and memory analyses.

    stats = hlo_stats.of(jax.jit(f).lower(*args).compile())

A speed change must show on the machine at hand before a GPU window confirms it; these are the figures that do
not depend on timing: XLA's FLOPs, the bytes its ops read and write (`bytes accessed`, summed over the
program's top-level ops: what a memory-bound elementwise pass costs), the temporary buffer, and how many
top-level ops of each kind the program runs (each fusion, copy, transpose or GEMM is a kernel launch on a
GPU; a `convert` or `copy` that survives fusion is a full pass over its tensor). Counted are the instructions
of every computation that is not a fusion's body (the entry, while bodies, called computations); the ops
inside fusions are counted separately by opcode (`fused`), so a change that moves work into a fusion shows as
one fewer top-level op.

XLA:CPU fuses less than XLA:GPU, so counts differ between platforms; compare variants on one platform.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
# top-level ops that are not work: they name, pass or group values
_BOOKKEEPING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
                "replica-id", "opt-barrier", "add-dependency"}


def _opcode(rhs: str) -> str | None:
    """The opcode of an instruction's right-hand side `shape opcode(operands), attrs`."""
    rest = rhs.lstrip()
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        _, _, rest = rest.partition(" ")
    m = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
    return m.group(1) if m else None


def op_counts(hlo_text: str) -> tuple[Counter, Counter]:
    """(top-level ops by opcode, ops inside fusion bodies by opcode) of an HLO module's text. A fusion's body
    is a computation some `fusion` instruction `calls=`; its instructions count as fused."""
    fused_names = set(re.findall(r"\bfusion\(.*?calls=%?([\w.\-]+)", hlo_text))
    top: Counter = Counter()
    fused: Counter = Counter()
    current = None
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and " = " not in line:
            m = _COMPUTATION.match(line)
            current = m.group(2) if m else None
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        op = _opcode(m.group(1))
        if op is None:
            continue
        (fused if current in fused_names else top)[op] += 1
    return top, fused


def dot_counts(hlo_text: str) -> tuple[int, int]:
    """(matmuls, float8 matmuls) of an optimized HLO module: every `dot` instruction wherever it sits (XLA:GPU puts
    them inside GEMM fusions), a float8 one when its computation holds float8 values (its operands or their
    transposes; XLA keeps a float8 x float8 dot in float8 inside its fusion)."""
    dots = f8 = 0
    for block in re.split(r"\n(?=\S)", hlo_text):  # computations start at column 0
        n = len(re.findall(r" dot\(", block))
        dots += n
        if n and re.search(r"\bf8e(4m3fn|5m2)\[", block):
            f8 += n
    return dots, f8


def of(compiled: Any) -> dict[str, Any]:
    """FLOPs, bytes accessed, transcendentals (XLA's cost analysis), temp and argument bytes (its memory
    analysis), the top-level op counts (`ops`, bookkeeping left out; `kernels` their sum) and the fused ops
    (`fused`) of a `jax.stages.Compiled`."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    top, fused = op_counts(compiled.as_text())
    ops = {k: v for k, v in sorted(top.items()) if k not in _BOOKKEEPING}
    out: dict[str, Any] = {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "transcendentals": float(cost.get("transcendentals", 0.0)),
        "kernels": int(sum(ops.values())),
        "ops": ops,
        "fused": dict(sorted(fused.items())),
    }
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
        out["argument_bytes"] = int(getattr(mem, "argument_size_in_bytes", 0))
    return out


KEY_OPS = ("fusion", "dot", "custom-call", "copy", "transpose", "convert", "concatenate")


def compare(rows: dict[str, dict], base: str) -> str:
    """A text table of `rows` (name -> `of(...)`) with each figure's ratio to row `base`."""
    b = rows[base]
    cols = ("flops", "bytes_accessed", "temp_bytes", "kernels") + KEY_OPS
    get = lambda r, c: float(r.get(c, r.get("ops", {}).get(c, 0)) or 0)
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v, v0 = get(r, c), get(b, c)
            val = f"{v / 1e9:.2f}G" if c in ("flops", "bytes_accessed", "temp_bytes") else f"{v:.0f}"
            cells.append(val if name == base or not v0 else f"{val} ({v / v0:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
