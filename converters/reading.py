"""Reading the source's weight files once: each shard is memory-mapped once, its tensors are views
of that mapping, and its SHA-256 is computed from the same pages the converter reads.

One thread (`SourceReading`) hashes the shards in the order the converter opens them, each from
its first byte to its last, staying at most READ_AHEAD_BYTES ahead of where the converter reads:
it is the one that waits for the disk, and the converter finds its pages in memory. A page both
are done with is dropped (unmapped, then `posix_fadvise(DONTNEED)`), so a checkpoint larger than
RAM passes through the page cache without filling it and without evicting pages not yet read;
the disk reads each byte once (`/proc/self/io` read_bytes ≈ the source's size).

The converter says where it reads through `MappedShard.report(key)`, in elements of one tensor
(`bloomconv.storage.ReadReport`): `reading` as it starts on a range, `done` once it will not read
it again. Where the layout of a shard cannot be tied to its file offsets (a legacy pickle, a
tensor that is not contiguous) the shard is hashed and dropped once the converter releases it.

>>> with SourceReading(Path("bloom-560m"), recorded={}) as reading:       # doctest: +SKIP
...     shard = reading.open("pytorch_model_00002-of-00026.bin")
...     weight = shard.tensor("h.0.mlp.dense_h_to_4h.weight")
...     reading.release(shard.name)
...     hashes = reading.finish(["pytorch_model_00002-of-00026.bin"])
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import mmap
import os
import struct
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from bloomconv.errors import HeaderError, SourceError
from bloomconv.hashing import sha256_file
from bloomconv.safetensors_io import read_header, torch_dtype

from .source import _is_pickle, _open_safetensors, load_pickle_shard

__all__ = ["HASH_CHUNK_BYTES", "READ_AHEAD_BYTES", "MappedShard", "SourceReading"]

# How far the hashing thread reads ahead of the converter: enough to keep the disk busy while the
# converter works on what was read, small next to the memory of any machine that converts.
READ_AHEAD_BYTES = 256 * 1024 * 1024
HASH_CHUNK_BYTES = 16 * 1024 * 1024  # hashed at a time (the disk is asked for the whole lead at once)
_PAGE = mmap.PAGESIZE


class MappedShard:
    """One weight file mapped once, its tensors as views of the mapping, and what the converter and
    the hashing thread have done with its bytes (under `_lock`)."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.path = root / name
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._tensors, self._spans = _map_tensors(self.path, self._map)
        self._lock = threading.Condition()
        self._touched = 0               # the furthest file offset the converter has started reading
        self._consumed = {key: 0 for key in self._spans}  # bytes of each tensor done with, from its start
        self._released = False          # the converter reads nothing more
        self._hashed = 0                # the hashing thread has read [0, _hashed)
        self._dropped = 0               # pages below this offset are dropped
        self._unmapped = 0              # pages below this offset are unmapped (still cached unless dropped)

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def report(self, key: str) -> "_TensorReport":
        """Where the converter reads tensor `key`, in its elements (bloomconv.storage.ReadReport)."""
        return _TensorReport(self, key)

    # -- the converter's side ------------------------------------------------------------------
    def _reading(self, key: str, begin: int, end: int) -> None:
        span = self._spans.get(key)
        if span is not None:
            with self._lock:
                if span[0] + end > self._touched:
                    self._touched = span[0] + end
                    self._unmap_far_behind()
                    self._lock.notify_all()

    def _done(self, key: str, begin: int, end: int) -> None:
        if key in self._consumed:
            with self._lock:
                if begin <= self._consumed[key] < end:
                    self._consumed[key] = end
                    self._drop_behind()

    def _release(self) -> None:
        with self._lock:
            self._released = True
            self._drop_behind()
            self._close_when_finished()
            self._lock.notify_all()

    # -- the hashing thread's side -------------------------------------------------------------
    def _readable_until(self) -> int:
        """How far the hashing thread may read now (under the lock)."""
        if self._released:
            return self.size
        if not self._spans:  # offsets unknown: wait for the converter to finish with the shard
            return self._hashed
        return min(self.size, self._touched + READ_AHEAD_BYTES)

    def _consumed_prefix(self) -> int:
        """The end of the prefix of the file the converter is done with (under the lock); bytes
        outside every tensor (zip and pickle records, headers) are only the hasher's."""
        if self._released:
            return self.size
        if not self._spans:
            return 0
        pending = [begin + self._consumed[key] for key, (begin, end) in self._spans.items()
                   if begin + self._consumed[key] < end]
        return min(pending, default=self.size)

    def _drop_behind(self) -> None:
        """Drop the pages both sides are done with (under the lock)."""
        end = min(self._hashed, self._consumed_prefix())
        end = self.size if end >= self.size else end - end % _PAGE
        if end <= self._dropped or self._map is None or not (_has_fadvise() and hasattr(mmap, "MADV_DONTNEED")):
            return
        start, self._dropped = self._dropped, end
        with contextlib.suppress(OSError, ValueError):  # advice only: never a reason to fail a conversion
            length = min(end, len(self._map)) - start
            self._map.madvise(mmap.MADV_DONTNEED, start, length)  # unmapped first: mapped pages stay cached
            _advise(self._file.fileno(), start, length, "POSIX_FADV_DONTNEED")

    def _unmap_far_behind(self) -> None:
        """Unmap, but keep cached, the pages READ_AHEAD_BYTES and more behind the furthest read
        that both sides have read (under the lock): what a second pass over a unit (4-bit double
        quant takes every absmax first) has yet to read again stays out of this process's RSS;
        that pass maps them again from the page cache."""
        end = min(self._hashed, self._touched - READ_AHEAD_BYTES)
        end -= end % _PAGE
        if end <= self._unmapped or self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, self._unmapped = self._unmapped, end
        with contextlib.suppress(OSError, ValueError):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _close_when_finished(self) -> None:
        """Once released and hashed: forget the mapping (it goes when the last tensor viewing it
        does) and close the file (under the lock)."""
        if self._released and self._hashed >= self.size and not self._file.closed:
            self._tensors = {}
            self._map = None
            self._file.close()


class _TensorReport:
    """`bloomconv.storage.ReadReport` for one tensor of a shard: element ranges to file bytes."""

    def __init__(self, shard: MappedShard, key: str):
        self._shard, self._key = shard, key
        self._itemsize = shard.tensor(key).element_size()

    def reading(self, start: int, end: int) -> None:
        self._shard._reading(self._key, start * self._itemsize, end * self._itemsize)

    def done(self, start: int, end: int) -> None:
        self._shard._done(self._key, start * self._itemsize, end * self._itemsize)


class SourceReading:
    """The source's weight files, opened once each and hashed by one thread as the converter reads
    them. `recorded` maps file names to the SHA-256 a resumed run already knows (those are read
    ahead for the converter but not hashed again); `on_hashed(name, sha256)` hears each new hash."""

    def __init__(self, root: Path, recorded: dict[str, str], on_hashed: Callable[[str, str], None] = lambda n, h: None):
        self.root = root
        self._recorded = dict(recorded)
        self._on_hashed = on_hashed
        self._shards: dict[str, MappedShard] = {}
        self._hashes: dict[str, str] = dict(recorded)
        self._queue: collections.deque[MappedShard | str | None] = collections.deque()
        self._queued: set[str] = set()
        self._wake = threading.Condition()
        self._failure: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hash-source", daemon=True)
        self._thread.start()

    def __enter__(self) -> "SourceReading":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, name: str) -> MappedShard:
        """The shard `name`, mapped (once) and queued for hashing."""
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = MappedShard(self.root, name)
            self._submit(shard)
        return shard

    def release(self, name: str) -> None:
        """The converter reads nothing more of `name`: it may be hashed to its end and dropped."""
        shard = self._shards.pop(name, None)
        if shard is not None:
            shard._release()

    def finish(self, names: list[str]) -> dict[str, str]:
        """Hash every file of `names` not hashed yet (those no unit opened: a resumed run); wait for
        all and return name -> SHA-256 hex. Raises what the hashing thread met."""
        for name in list(self._shards):
            self.release(name)
        for name in names:
            if name not in self._hashes and name not in self._queued:
                self._submit(name)
        self._submit(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return {name: self._hashes[name] for name in names}

    def close(self) -> None:
        """Stop the thread (after an error: nothing is waited for)."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        for shard in list(self._shards.values()):
            shard._release()
        self._thread.join()

    def _submit(self, item: MappedShard | str | None) -> None:
        with self._wake:
            if item is not None:
                self._queued.add(item if isinstance(item, str) else item.name)
            self._queue.append(item)
            self._wake.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._stop:
                        self._wake.wait()
                    if self._stop:
                        return
                    item = self._queue.popleft()
                if item is None:
                    return
                name = item if isinstance(item, str) else item.name
                sha256 = self._hash(item) if name not in self._recorded else self._read_ahead(item)
                if sha256 is not None:
                    self._hashes[name] = sha256
                    self._on_hashed(name, sha256)
        except BaseException as exc:  # raised again by finish()
            self._failure = exc

    def _hash(self, item: MappedShard | str) -> str | None:
        """SHA-256 of a shard, read from its mapping within the converter's lead; or of a file no
        unit opened, read plainly."""
        if isinstance(item, str):
            return sha256_file(self.root / item)
        digest = hashlib.sha256()
        if not self._walk(item, digest.update):
            return None
        return digest.hexdigest()

    def _read_ahead(self, item: MappedShard | str) -> None:
        """For a shard whose hash a resumed run knows: only ask the disk for it ahead of the converter."""
        if isinstance(item, MappedShard):
            self._walk(item, lambda view: None)

    def _walk(self, shard: MappedShard, consume: Callable[[memoryview], None]) -> bool:
        """Pass the shard's bytes to `consume` in order, each chunk once the lead rule allows it,
        having asked the disk for all it may read; False when stopped."""
        fd = shard._file.fileno()
        position = requested = 0
        while position < shard.size:
            with shard._lock:
                while True:
                    if self._stop:
                        return False
                    limit = shard._readable_until()
                    if limit > position:
                        break
                    shard._lock.wait(0.1)
            if limit > requested:  # everything it may read is asked of the disk at once: a deep queue
                _advise(fd, requested, limit - requested, "POSIX_FADV_WILLNEED")
                requested = limit
            end = min(limit, position + HASH_CHUNK_BYTES)
            consume(memoryview(shard._map)[position:end])
            position = end
            with shard._lock:
                shard._hashed = position
                shard._drop_behind()
        with shard._lock:  # what the converter has yet to finish is dropped as it reports it
            shard._close_when_finished()
        return True


def _has_fadvise() -> bool:
    """Linux and the BSDs have posix_fadvise; macOS and Windows do not (there pages are not
    dropped: the OS evicts them as it sees fit)."""
    return hasattr(os, "posix_fadvise")


def _advise(fd: int, start: int, length: int, advice: str) -> None:
    if length > 0 and _has_fadvise() and hasattr(os, advice):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, length, getattr(os, advice))


# ---------------------------------------------------------------------------- tensor views

def _map_tensors(path: Path, mapping: mmap.mmap | None) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """A shard's tensors, as views of `mapping` where their file offsets are known, and those
    offsets: key -> (first byte, end)."""
    if _is_pickle(path.name):
        state = load_pickle_shard(path)
        offsets = _pickle_offsets(path, state)
    else:
        try:
            header = read_header(path)
        except HeaderError:
            header = None
        if header is None:  # safetensors reads files bloomconv's strict reader refuses: copy them
            handle = _open_safetensors(path)
            return {key: handle.get_tensor(key) for key in handle.keys()}, {}
        state = {key: torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
                 for key, info in header.tensors.items()}
        offsets = {key: header.data_start + info.begin for key, info in header.tensors.items()}
    tensors, spans = {}, {}
    for key, tensor in state.items():
        begin = None if offsets is None else offsets.get(key)
        nbytes = tensor.numel() * tensor.element_size()
        if begin is None or mapping is None or not tensor.is_contiguous() or begin + nbytes > len(mapping):
            tensors[key] = tensor
        elif nbytes == 0:
            tensors[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
        else:
            with warnings.catch_warnings():  # a read-only mapping: nothing writes to the source
                warnings.simplefilter("ignore", UserWarning)
                view = torch.frombuffer(mapping, dtype=tensor.dtype, count=tensor.numel(), offset=begin)
            tensors[key] = view.view(tensor.shape)
            spans[key] = (begin, begin + nbytes)
    if any(t.device.type == "meta" for t in tensors.values()):
        raise SourceError(path, "tensors lie outside the file", "Download this shard again.")
    return tensors, spans if len(spans) == len(tensors) else {}


def _pickle_offsets(path: Path, state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """File offset of each tensor's first byte in a torch zip checkpoint, or None where they cannot
    be told for certain. torch.load(mmap=True) slices one mapping of the file at each storage
    record's offset: the storages, in address order, are the data records in file order."""
    try:
        records = _zip_data_offsets(path)
    except (OSError, zipfile.BadZipFile, struct.error, ValueError):
        return None
    storages = {t.untyped_storage().data_ptr() for t in state.values() if t.untyped_storage().nbytes()}
    if not records or len(storages) != len(records):
        return None
    base = min(storages) - min(records)
    if {ptr - base for ptr in storages} != set(records):
        return None
    return {key: t.data_ptr() - base for key, t in state.items() if t.untyped_storage().nbytes()}


def _zip_data_offsets(path: Path) -> list[int]:
    """Where the data of each non-empty `…/data/N` record of a torch zip checkpoint starts."""
    offsets = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) < 2 or parts[-2] != "data" or not info.file_size:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError("compressed record")
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError("no local header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            offsets.append(info.header_offset + 30 + name_length + extra_length)
    return offsets
