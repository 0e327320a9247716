"""Float32 comparisons whose tolerance follows the computation, not the element.

XLA:CPU's float32 results vary slightly with thread scheduling (the order of
partial sums in a reduction), and a deep stack (T5, CLIP, an MMDiT) carries
such a difference through every layer. An element-wise bound such as
`rtol=1e-5, atol=1e-6` then fails on the one element of hundreds that sits
near zero. The error that matters is the largest absolute error measured
against the tensor's own scale (its largest magnitude): about 1e-7 for one
float32 operation, and up to ~1e-5 after a few dozen layers. Tests compare
deep stacks at 1e-4 of the scale and shallow computations tighter.
"""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the error relative to the reference's scale)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shapes differ: {ours.shape} vs {ref.shape}")
    scale = np.abs(ref).max()
    return float(np.abs(ours - ref).max() / scale) if scale > 0 else float(np.abs(ours).max())


def assert_close(ours, ref, rel: float, what: str = "") -> None:
    """Asserts rel_err(ours, ref) <= rel, naming `what` and the error on failure."""
    err = rel_err(ours, ref)
    assert err <= rel, f"{what or 'tensor'}: error {err:.3g} of the reference's scale > {rel:g}"
