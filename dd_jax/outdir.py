"""Output folders of the command-line tools (`decompose`, `evaluate`): files moved in so that none is replaced
by accident, or left half-written.

`check_folder(output)` refuses (one line) an output that is not, and cannot be made, a writable folder, before
any work and without making anything.

`write_files([(dest, write), ...], overwrite=...)` writes each file to a temporary name in its folder, then
moves them all in: with `overwrite` by renames (replacing), without by hard links, which fail (FileExistsError)
when a `dest` exists, even a file that appeared after the run checked. A killed or failed write leaves no
partial file, and a set of files (one image's layers, a report) comes whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence


def check_folder(output: str) -> None:
    """Raises ValueError (one line) unless `output` is, or can be made, a writable folder: checked before
    any model runs. Nothing is created."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output}: exists and is not a folder; choose a folder")
    existing = os.path.abspath(output)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {output}: {existing} is a file, so no folder can be made under it")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".dd_jax-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output {output}: {existing} is not writable ({e.strerror or e}); choose another "
                         f"folder") from e


def write_files(files: Sequence[tuple[str, Callable[[str], object]]], *, overwrite: bool) -> None:
    """Writes each `(dest, write)` by `write(tmp)` to a temporary name in `dest`'s folder; once all are written,
    moves them to their `dest`s: replacing existing files only with `overwrite`, else by hard links that fail
    (FileExistsError, the file kept) if a `dest` exists, and then the ones this call moved in are taken out
    again. So a failed or interrupted call leaves no partial file, and the whole set or none of it (a kill
    between two moves aside). Temporary files are removed whatever happens (when they can be)."""
    tmps, moved = [], []
    try:
        for i, (dest, write) in enumerate(files):
            folder, name = os.path.split(os.path.abspath(dest))
            tmp = os.path.join(folder, f".{name[:40]}.partial-{os.getpid()}-{i}")  # short: `dest` may be long
            tmps.append(tmp)
            write(tmp)
        for (dest, _), tmp in zip(files, tmps):
            if overwrite:
                os.replace(tmp, dest)
            else:
                os.link(tmp, dest)  # fails if `dest` exists, whoever made it and whenever
                moved.append(dest)
                os.remove(tmp)
    except BaseException:
        for path in tmps + (moved if not overwrite else []):
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def write_file(dest: str, write: Callable[[str], object], *, overwrite: bool) -> None:
    """`write_files` of one file."""
    write_files([(dest, write)], overwrite=overwrite)
