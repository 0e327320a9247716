"""Calling a command-line tool's `main` in-process, as the shell would: its exit status and what it printed."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout


def run_main(main, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `main(argv)`; a SystemExit's code counts as the status."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()
