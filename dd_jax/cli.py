"""What the command-line tools share: one-line usage errors, and suggestions for a mistyped path.

`ArgumentParser` is argparse's with a usage error as one line on stderr, `error: MESSAGE (PROG --help lists the
options)`, and exit status 2 (argparse prints its whole usage block first). `close_matches(path)` names the
existing paths a mistyped one was probably meant to be (`difflib` over its folder's entries: cheap, one listing).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments: --config." in message:
            message += ("; this tool takes no --config.FIELD overrides: set the fields in a config file and pass it "
                        "with --config")
        print(f"error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        self.exit(2)


def close_matches(path: str, n: int = 3, cutoff: float = 0.75) -> list[str]:
    """Existing paths like `path` (a name that does not exist): entries of its folder (or of the nearest folder
    above it that exists) whose names are close to its own. [] when there are none."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.normpath(path))
    while folder and not os.path.isdir(folder):  # a mistyped folder: match the name under the nearest one there is
        folder, name = os.path.split(folder)
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return []
    return [os.path.join(folder, m) for m in difflib.get_close_matches(name, entries, n=n, cutoff=cutoff)]


def not_found(path: str, what: str) -> str:
    """`WHAT PATH: no such file or folder`, with `did you mean ...?` when there are close matches."""
    near = close_matches(path)
    return f"{what} {path}: no such file or folder" + (f"; did you mean {' or '.join(near)}?" if near else "")
