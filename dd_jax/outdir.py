"""Output folders of the command-line tools (`decompose`, `evaluate`): one run at a time per folder, and files
moved in so that none is replaced by accident, or left half-written.

`check_folder(output)` refuses (one line) an output that is not, and cannot be made, a writable folder, before
any work and without making anything. `locked(folder, tool)` holds an exclusive lock (`fcntl.flock`,
non-blocking) on `folder/.dd_jax.lock` for a run's duration: a second run on the same folder fails at once with
one line naming the first's pid. The lock file is removed when the run ends (a killed run leaves it, unlocked:
the next run takes it over). The folder is made if needed, and removed again if the run leaves it empty.

`write_files([(dest, write), ...], overwrite=...)` writes each file to a temporary name in its folder, then
moves them all in: with `overwrite` by renames (replacing), without by hard links, which fail (FileExistsError)
when a `dest` exists, even a file that appeared after the run checked. A killed or failed write leaves no
partial file, and a set of files (one image's layers, a report) comes whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

LOCK_FILE = ".dd_jax.lock"


class FolderInUse(ValueError):
    """Another run holds the output folder's lock."""


def _holder(path: str, tool: str) -> tuple[str, str]:
    """(tool, pid) of the run holding the lock file `path`, as it wrote them ("unknown" pid if unreadable)."""
    try:
        with open(path) as f:
            pid, _, holder = f.read().strip().partition(" ")
    except OSError:
        pid = holder = ""
    return holder or tool, pid or "unknown"


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


@contextlib.contextmanager
def locked(folder: str, tool: str) -> Iterator[None]:
    """Makes `folder` if needed and holds its lock while the body runs; raises FolderInUse (one line) if another
    run holds it (`tool`: the run's name, for that message). On exit the lock file is removed, and `folder` too
    if this call made it and it is empty."""
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder, pid = _holder(path, tool)
                raise FolderInUse(f"{folder} is in use by another {holder} run (pid {pid}); wait for it to end or "
                                  f"choose another --output") from None
            try:  # the file we locked may have been removed by a run that just ended: lock the current one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {tool}\n".encode())
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)  # while still locked: a run waiting on this file sees it gone and retries
            os.close(fd)
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty: a run that wrote nothing leaves no folder behind


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
                try:
                    os.link(tmp, dest)  # fails if `dest` exists, whoever made it and whenever
                except FileExistsError as e:
                    raise FileExistsError(e.errno, e.strerror, dest) from None
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


def name_max(folder: str) -> int:
    """The longest file name (bytes) `folder`'s file system takes (255 where it does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def is_name_error(e: OSError) -> bool:
    """Whether `e` is about one file's name (too long, characters the file system refuses), not the folder or the
    disk."""
    return e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL)
