"""Crash-safe file writes: temporary file in the same folder, fsync, rename, fsync the folder.

`atomic_file` does it all in one `with`; `open_temporary` + `commit` split it so a caller can
fsync one file on a background thread while it writes the next.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from .format import TMP_MARKER


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_temporary(path: str | os.PathLike) -> BinaryIO:
    """A new file next to `path`, named so that `is_temporary` recognises leftovers.

    The name is predictable, so it is created exclusively and never through a symlink: a link
    planted there fails the open instead of sending the bytes elsewhere."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    temporary.unlink(missing_ok=True)  # a leftover of an earlier process with this pid (or a link)
    return open(temporary, "wb", opener=_create_exclusively)


def _create_exclusively(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def commit(temporary: BinaryIO, path: str | os.PathLike) -> None:
    """Make the written temporary file durable under its final name; remove it on failure."""
    try:
        temporary.flush()
        os.fsync(temporary.fileno())
        temporary.close()
        os.replace(temporary.name, path)
        fsync_dir(Path(path).parent)
    except BaseException:
        discard(temporary)
        raise


def discard(temporary: BinaryIO) -> None:
    with contextlib.suppress(OSError):  # flushing its buffer fails again on a full disk
        temporary.close()
    Path(temporary.name).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a binary file; on success it replaces `path` durably, on error it is removed."""
    f = open_temporary(path)
    try:
        yield f
    except BaseException:
        discard(f)
        raise
    commit(f, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def is_temporary(name: str) -> bool:
    return TMP_MARKER in name
