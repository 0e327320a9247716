"""The one place that knows which optional packages some tests compare against, and why they may be absent.

`lpips` and `pytorch-fid` ship the reference code of LPIPS and FID; the tests run that code with a
stand-in torchvision. Both declare torchvision, whose builds need torch 2.14, so pip would replace the
pinned torch 2.13: they are not in the `test` extra and install with

    pip install --no-deps lpips==0.1.4 pytorch-fid==0.3.0

A test that needs one skips with a reason that starts with "known:" (pytest -ra lists it).
"""

from __future__ import annotations

import importlib.util

import pytest

INSTALL = "pip install --no-deps lpips==0.1.4 pytorch-fid==0.3.0"
KNOWN = {
    "lpips": "the lpips package (LPIPS reference code and its linear heads)",
    "pytorch_fid": "the pytorch-fid package (FID reference code)",
}


def needs(module: str, available: bool | None = None):
    """A skipif marker for a test that needs the optional `module` (one of KNOWN)."""
    if module not in KNOWN:
        raise KeyError(f"{module!r} is not a known optional package: add it to tests/optional_deps.py")
    if available is None:
        available = importlib.util.find_spec(module) is not None
    return pytest.mark.skipif(not available, reason=f"known: needs {KNOWN[module]}; {INSTALL}")
