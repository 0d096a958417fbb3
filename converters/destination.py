"""The destination directory of a conversion: its lock, its job record and its journal.

A run writes DST/.bloomconv-job.json first (what is being made, from what, and the command that
started it), then one journal entry per finished output file, then the manifest. Re-running the
same command finds the job record, keeps every journaled file whose bytes still hash to the
journal entry, and redoes the rest. A different job into the same DST is refused, naming the
command that started the unfinished one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt's lock instead
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

from bloomconv.atomic import atomic_write_bytes, is_temporary
from bloomconv.errors import DestinationBusyError, DestinationError
from bloomconv.format import JOB_NAME, JOURNAL_DIR, LOCK_NAME, MANIFEST_NAME
from bloomconv.hashing import sha256_file
from bloomconv.manifest import FileEntry


class Destination:
    """Holds DST's lock for the duration of a `with` block."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __enter__(self) -> "Destination":
        if fcntl is None and msvcrt is None:
            raise DestinationError(self.path, "cannot lock the destination: this Python has neither fcntl.flock nor "
                                   "msvcrt.locking", "Convert with CPython on Linux, macOS or Windows.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DestinationError(self.path, f"cannot create the destination ({exc.strerror})",
                                   "Choose a writable destination.") from None
        while self._lock_fd is None:
            self._lock_fd = self._lock()
        return self

    def _lock(self) -> int | None:
        """A locked descriptor of DST's lock file; None when that file was removed meanwhile."""
        path = self.path / LOCK_NAME
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise explain_os_error(self.path, exc) from None
        if not _try_lock(fd):
            os.close(fd)
            raise DestinationBusyError(self.path, "another bloomconv process is writing here",
                                       "Wait for it to finish, or pick another destination.") from None
        # A holder removes the file as it leaves: a lock won on the removed file would guard
        # nothing against the next process, which creates a new one. Take the new one instead.
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(current, os.fstat(fd)):
            os.close(fd)
            return None
        return fd

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            if fcntl is not None:
                (self.path / LOCK_NAME).unlink(missing_ok=True)
                os.close(self._lock_fd)
            else:  # Windows removes no open file: close first; a file another writer opened meanwhile stays
                os.close(self._lock_fd)
                with contextlib.suppress(PermissionError):
                    (self.path / LOCK_NAME).unlink(missing_ok=True)
            self._lock_fd = None

    # -- job record -------------------------------------------------------------------------
    def start_or_resume(self, job: dict, started_by: dict) -> bool:
        """Record `job`, or accept the identical unfinished one. Returns True when resuming.

        `started_by` ({"command": "quantize --bits 8", "source": "/abs/src"}) is kept with the job
        to name it when another run is refused, and is not compared: the same job resumes from
        wherever it is started."""
        job_path = self.path / JOB_NAME
        if job_path.exists():
            self.refuse_other_job(job)
            self._remove_temporaries()
            self.folder(JOURNAL_DIR)
            return True
        # A run killed before its job record was in place leaves at most a temporary file and
        # an empty journal: treat the directory as empty then.
        stray = [p.name for p in self.path.iterdir()
                 if p.name != LOCK_NAME and not is_temporary(p.name)
                 and not (p.name == JOURNAL_DIR and not any(p.iterdir()))]
        if stray:
            raise DestinationError(self.path, f"is not empty ({', '.join(sorted(stray)[:3])}…) and holds "
                                   "no bloomconv conversion", "Choose an empty or new destination.")
        self._remove_temporaries()
        atomic_write_bytes(job_path, json.dumps({**job, _STARTED_BY: started_by}, sort_keys=True).encode())
        self.folder(JOURNAL_DIR)
        return False

    def refuse_other_job(self, job: dict) -> None:
        """Raise DestinationError naming the command that started DST's job unless it is `job`."""
        try:
            recorded = json.loads((self.path / JOB_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        origin = recorded.pop(_STARTED_BY, None) if isinstance(recorded, dict) else None
        if recorded != job:
            raise _other_job(self.path, origin)

    def _remove_temporaries(self) -> None:
        for p in self.path.rglob("*"):
            if is_temporary(p.name) and (p.is_symlink() or p.is_file()):
                p.unlink()

    def folder(self, name: str) -> Path:
        """DST/name, created if need be; refused if it is a symlink, which would send writes elsewhere."""
        path = self.path / name
        path.mkdir(exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise DestinationError(path, "is a symbolic link or not a folder; bloomconv writes only inside "
                                   "the destination", "Remove it and re-run the same command.")
        return path

    def has_manifest(self) -> bool:
        return (self.path / MANIFEST_NAME).is_file()

    def finish(self) -> None:
        """After the manifest is written: drop the bookkeeping."""
        shutil.rmtree(self.path / JOURNAL_DIR, ignore_errors=True)
        (self.path / JOB_NAME).unlink(missing_ok=True)

    # -- journal ----------------------------------------------------------------------------
    def _journal_path(self, key: str) -> Path:
        return self.path / JOURNAL_DIR / (key.replace("/", "__") + ".json")

    def record(self, key: str, entry: FileEntry) -> None:
        atomic_write_bytes(self._journal_path(key), json.dumps(entry.to_dict()).encode())

    def recorded(self, key: str) -> FileEntry | None:
        try:
            return FileEntry.from_dict(json.loads(self._journal_path(key).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def completed_output(self, key: str) -> FileEntry | None:
        """The journal entry for an output file whose bytes on disk still match it."""
        entry = self.recorded(key)
        if entry is None:
            return None
        path = self.path / entry.name
        try:
            if path.stat().st_size == entry.size and sha256_file(path) == entry.sha256:
                return entry
        except OSError:
            pass
        return None


_STARTED_BY = "started_by"


def _other_job(path: Path, origin) -> DestinationError:
    if isinstance(origin, dict) and isinstance(origin.get("command"), str) and isinstance(origin.get("source"), str):
        command, source = origin["command"], origin["source"]
        return DestinationError(path, f"holds an unfinished `bloomconv {command}` conversion of {source}",
                                f"Re-run `bloomconv {command} {source} {path}` to finish it, or choose an empty "
                                "destination.")
    return DestinationError(path, "holds an unfinished conversion of a different source or with different settings",
                            "Re-run that exact command to finish it, or choose an empty destination.")


def _try_lock(fd: int) -> bool:
    """Lock `fd` exclusively without waiting; False when another process holds the lock. flock
    on Linux and macOS, msvcrt's lock of the first byte on Windows; closing `fd` releases it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # held by another process
        return False
    return True


def explain_os_error(path: Path, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(path, "no space left on the destination's filesystem",
                                "Free space (or pick another disk) and re-run the same command to resume.")
    if exc.errno in (errno.ELOOP, errno.EEXIST):  # O_NOFOLLOW / O_EXCL met something planted
        return DestinationError(path, f"refused to write through {exc.filename}: a symbolic link or "
                                "unexpected file stands there", "Remove it and re-run the same command.")
    return DestinationError(path, f"cannot write ({exc.strerror})",
                            "Fix the destination, then re-run the same command to resume.")
