"""SHA-256 of files, using every core: hashlib releases the GIL on large buffers, so threads
hash different files in parallel at full OpenSSL speed (SHA-NI where the CPU has it)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

READ_CHUNK_BYTES = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike, on_bytes=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # no larger than the file: a small one (config, tokenizer) must not cost 8 MB that the
        # allocator of the hashing thread may keep (the runtime's fast check hashes those)
        buffer = bytearray(max(1, min(READ_CHUNK_BYTES, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if on_bytes:
                on_bytes(n)
    return digest.hexdigest()


def sha256_files(paths: list[Path], workers: int | None = None, on_bytes=None) -> dict[Path, str | OSError]:
    """Hash files in parallel, largest first so the longest file starts early.
    Returns path -> hex digest, or the OSError that reading it raised."""
    workers = workers or os.cpu_count() or 1
    sizes = {p: p.stat().st_size for p in paths}
    order = sorted(paths, key=lambda p: -sizes[p])

    def one(path):
        try:
            return sha256_file(path, on_bytes)
        except OSError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(order, pool.map(one, order)))
