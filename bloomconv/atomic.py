"""Crash-safe file writes: temporary file in the same folder, fsync, rename, fsync the folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .format import TMP_MARKER


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a binary file; on success it replaces `path` durably, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def is_temporary(name: str) -> bool:
    return TMP_MARKER in name
