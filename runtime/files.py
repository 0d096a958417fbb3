"""File I/O of the runtime: one safetensors file's header, descriptors and mapping, large reads that
bypass the page cache, and the anonymous memory they read into.

Reads are large `preadv` calls (a seek and a read where the system lacks it), which release the
GIL while torch computes, through a descriptor opened with O_DIRECT on Linux (F_NOCACHE on
macOS): the bytes go straight from the disk into the process's memory, without a copy in the page
cache that would evict other pages, count twice against a memory cgroup, and cost the CPU a copy.
READS_IN_FLIGHT of them at a time: the kernel's read-ahead does not run for such a descriptor, and
one request at a time left the disk idle between requests (on the development machine's disk,
0.7–1.0 GB/s with one, 1.7–2.1 GB/s with four; `cat` 0.5–1.9 GB/s, the disk is shared).
Where that is refused (tmpfs, other systems) reads are buffered, in order, leaving the kernel's
read-ahead to keep the disk busy; a streamed file's chunks are then dropped behind with
`posix_fadvise(DONTNEED)` where the system has it.

Memory is plain private anonymous memory, and no mlock (see `AnonymousBuffer`). Pinned files get
no transparent huge pages (MADV_HUGEPAGE made the kernel compact memory while faulting in
gigabytes of pinned weights, reading them at a fifth of the disk's speed); the few stream buffers
do. The pinned buffers are faulted in by a thread of their own running alongside the reads
(`FaultingIn`).

>>> file = MappedFile(Path("bloom/block_000.safetensors"), quant={})        # doctest: +SKIP
>>> buffer = AnonymousBuffer(file.padded_size)                              # doctest: +SKIP
>>> file.read_spans(buffer.memoryview(), file.whole, streaming=False)       # doctest: +SKIP
>>> tensors = file.tensors_in(buffer)                                       # doctest: +SKIP
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import functools
import io
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch

from bloomconv.errors import VerificationError
from bloomconv.format import NARROW_FLOAT_DTYPES, QuantType
from bloomconv.safetensors_io import SafetensorsHeader, read_header, torch_dtype

from .records import UnitBytes, aligned

__all__ = ["AnonymousBuffer", "FaultingIn", "MappedFile", "PAGE", "READ_CHUNK_BYTES", "Span", "read_one_after_another",
           "whole_pages"]

READ_CHUNK_BYTES = 16 << 20  # per preadv call; a buffered streamed read drops the page cache per chunk
READS_IN_FLIGHT = 4
PAGE = mmap.PAGESIZE
# macOS's "no caching on this descriptor" (the <sys/fcntl.h> value where Python does not name it)
F_NOCACHE = getattr(fcntl, "F_NOCACHE", 48) if sys.platform == "darwin" else None

# (offset in the file, bytes, offset in the buffer): page-aligned, as O_DIRECT reads must be
Span = tuple[int, int, int]


def whole_pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


class MappedFile:
    """One safetensors file: its header, open descriptors, and a lazy read-only mapping.

    The mapping serves what touches a few pages (embedding rows, layer norms and biases of a
    streamed file, inspecting weights outside a forward pass); weight bytes used in a forward
    pass are read with `read_spans` (a whole file: `whole`, or a streamed piece) or, pinned at
    start-up, `read_one_after_another`.
    """

    def __init__(self, path: Path, quant: dict[str, QuantType]):
        self.path = path
        self.quant = quant  # the manifest's storage type of each tensor
        self.header: SafetensorsHeader = read_header(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # O_BINARY: Windows
        self._uncached_fd: int | None | bool = None  # opened on first read; False: not possible here
        self._mapping: mmap.mmap | None = None
        self._view: UnitBytes | None = None
        self._layout: UnitBytes | None = None
        self._offsets: dict[int, int] = {}  # id of a layout tensor -> where its bytes start in the file

    @property
    def size(self) -> int:
        return self.header.file_size

    @property
    def padded_size(self) -> int:
        return whole_pages(self.size)

    @property
    def resident_size(self) -> int:
        """Bytes in RAM once read whole: the file's pages, plus a copy of each tensor that does not
        start at a multiple of its item size (`UnitBytes.parse`)."""
        return self.padded_size + sum(aligned(info.end - info.begin) for info in self.header.tensors.values()
                                      if (self.header.data_start + info.begin) % torch_dtype(info.dtype).itemsize)

    @property
    def widened_size(self) -> int:
        """Bytes in RAM once 16-bit float tensors are widened to float32 (`UnitBytes.widened_into`)."""
        total = 0
        for info in self.header.tensors.values():
            itemsize = 4 if info.dtype in NARROW_FLOAT_DTYPES else torch_dtype(info.dtype).itemsize
            total += aligned(math.prod(info.shape) * itemsize)
        return total

    def view(self) -> UnitBytes:
        """The tensors as views of the file mapping (pages come in as they are touched)."""
        if self._view is None:
            # ACCESS_COPY: a private mapping torch can wrap without a read-only warning; nothing
            # writes to it, so its pages stay shared with the page cache.
            self._mapping = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            self._view = UnitBytes.parse(self.header, torch.frombuffer(self._mapping, dtype=torch.uint8), self.quant)
        return self._view

    def layout(self) -> UnitBytes:
        """The tensors as they lie in the file, for planning reads: those of up to a page are the
        mapping's (a 4-bit state blob is read to decode its weight), larger ones are meta tensors
        (dtype and shape only, nothing read), placed by `file_offset`."""
        if self._layout is None:
            tensors = {}
            for name, info in self.header.tensors.items():
                if info.end - info.begin <= PAGE:
                    tensors[name] = self.view().get(name)
                else:
                    tensors[name] = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
                    self._offsets[id(tensors[name])] = self.header.data_start + info.begin
            self._layout = UnitBytes(tensors, self.quant)
        return self._layout

    def file_offset(self, tensor: torch.Tensor) -> int:
        """Where the bytes of a meta tensor of `layout()`, or of a view of one, start in the file."""
        base = tensor if tensor._base is None else tensor._base
        return self._offsets[id(base)] + tensor.storage_offset() * tensor.element_size()

    def widened(self) -> tuple[UnitBytes, "AnonymousBuffer"]:
        """`UnitBytes.widened_into` a new buffer straight from the page cache (no copy of the file
        in between), then the mapping's pages are let go (they stay cached, out of this process)."""
        view = self.view()
        _advise(self._mapping, "MADV_WILLNEED")
        buffer = AnonymousBuffer(self.widened_size)
        try:
            return view.widened_into(buffer.tensor), buffer
        finally:
            _advise(self._mapping, "MADV_DONTNEED")

    @property
    def whole(self) -> tuple[Span]:
        """The span of the whole file, read to the start of a buffer."""
        return ((0, self.padded_size, 0),)

    def tensors_in(self, buffer: "AnonymousBuffer") -> UnitBytes:
        """The file's tensors over `buffer` (of at least `padded_size` bytes), once the whole file
        has been read into it."""
        return UnitBytes.parse(self.header, buffer.tensor[:self.size], self.quant)

    def read_spans(self, memory: memoryview, spans: Sequence[Span], *, streaming: bool) -> None:
        """Read each span into `memory`, READ_CHUNK_BYTES per call, around the page cache where the
        system allows (see the module's docstring). `streaming`: the file is read again every
        pass, so where reads must be buffered, drop what was read from the page cache."""
        chunks, at_once = self._chunk_reads(memory, spans, streaming)
        if at_once and len(chunks) > 1:
            list(_read_pool().map(lambda read: read(), chunks))
        else:
            for read in chunks:
                read()

    def _chunk_reads(self, memory: memoryview, spans: Sequence[Span],
                     streaming: bool) -> tuple[list[Callable[[], None]], bool]:
        """`read_spans`'s reads, one call each, and whether they may run at once (around the page
        cache); else they must run in order."""
        if self._uncached_fd is None:
            fd = _open_uncached(self.path)
            self._uncached_fd = False if fd is None else fd
        uncached = self._uncached_fd is not False
        fd = self._uncached_fd if uncached else self._fd
        if not uncached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # O_DIRECT reads whole pages: a last one runs past the end of the file (returns short)
        chunks = [(offset, min(offset + READ_CHUNK_BYTES, start + length), at + offset - start)
                  for start, length, at in spans for offset in range(start, min(start + length, self.size),
                                                                     READ_CHUNK_BYTES)]

        def read(chunk: tuple[int, int, int]) -> None:
            done, stop, at = chunk
            stop = stop if uncached else min(stop, self.size)
            while done < min(stop, self.size):
                n = _read_at(fd, memory[at:at + stop - done], done)
                if n <= 0:
                    raise VerificationError(self.path.parent, [f"{self.path.name}: truncated while running "
                                                               f"({done} of {self.size} bytes)"])
                if streaming and not uncached and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, done, n, os.POSIX_FADV_DONTNEED)
                done, at = done + n, at + n
        return [functools.partial(read, chunk) for chunk in chunks], uncached

    @property
    def reads_around_the_page_cache(self) -> bool | None:
        """Whether reads bypass the page cache (None before the first read)."""
        return None if self._uncached_fd is None else self._uncached_fd is not False

    def close(self) -> None:
        os.close(self._fd)
        if self._uncached_fd:
            os.close(self._uncached_fd)


def read_one_after_another(reads: Sequence[tuple[MappedFile, memoryview, Sequence[Span]]],
                           stop: threading.Event) -> Iterator[int]:
    """Read each (file, memory, spans) as `read_spans` does, but with no pause between one read and
    the next: the calls of all of them that may run at once are queued together, READS_IN_FLIGHT in
    flight, so the disk never waits for a read's last call before the next read's first. Yields
    each read's index once its bytes are in, in order. `stop` set: the calls not yet started are
    dropped and the iteration ends; nothing runs after it has (it waits for calls in flight)."""
    planned = [file._chunk_reads(memory, spans, streaming=False) for file, memory, spans in reads]
    pool = _read_pool()
    queued: list[list[concurrent.futures.Future] | None] = []
    try:
        for chunks, at_once in planned:
            queued.append([pool.submit(read) for read in chunks] if at_once else None)
        for index, ((chunks, _), futures) in enumerate(zip(planned, queued)):
            if stop.is_set():
                return
            if futures is None:  # buffered reads, in order, here
                for read in chunks:
                    read()
            else:
                for future in futures:
                    future.result()
            yield index
    finally:
        waiting = [future for futures in queued if futures for future in futures if not future.cancel()]
        concurrent.futures.wait(waiting)  # no call may still write into a buffer its caller lets go


_READERS: list[concurrent.futures.ThreadPoolExecutor] = []


def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
    """READS_IN_FLIGHT threads for reads around the page cache, started on first use."""
    if not _READERS:
        _READERS.append(concurrent.futures.ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="bloomconv-io"))
    return _READERS[0]


def _open_uncached(path: Path) -> int | None:
    """A descriptor whose reads bypass the page cache: O_DIRECT (Linux; whole, aligned pages) or
    F_NOCACHE (macOS). None where the system has neither or the filesystem refuses (tmpfs…)."""
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
        if not _direct_reads_work(fd):
            os.close(fd)
            return None
        return fd
    if F_NOCACHE is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, F_NOCACHE, 1)
        except OSError:
            os.close(fd)
            return None
        return fd
    return None


_DIRECT_READS_WORK: dict[int, bool] = {}  # filesystem (st_dev) -> whether it takes O_DIRECT reads


def _direct_reads_work(fd: int) -> bool:
    """Whether the filesystem of `fd` (opened with O_DIRECT) takes its reads: some accept the flag at
    open and refuse the read (EINVAL). Tried once per filesystem with a read of one page: that read
    goes to the disk, and a cold one took 30–100 ms on a network disk, paid per file before any
    weight was read. Another error (EIO…) answers for this file only: the next one tries again."""
    device = os.fstat(fd).st_dev
    if device not in _DIRECT_READS_WORK:
        try:
            _read_at(fd, memoryview(_anonymous_memory(PAGE)), 0)  # page-aligned
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return False
            _DIRECT_READS_WORK[device] = False
        else:
            _DIRECT_READS_WORK[device] = True
    return _DIRECT_READS_WORK[device]


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` of `fd`; the bytes read, 0 at the end of the file."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    # macOS before 11, Windows: seek, then read (only the reader thread reads these descriptors)
    with io.FileIO(fd, "r", closefd=False) as file:
        file.seek(offset)
        return file.readinto(view) or 0


def _anonymous_memory(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory. Private, not Python's default shared mapping, where the
    system has the flags (all but Windows): shared anonymous memory is shmem, reported as
    RssShmem instead of RssAnon."""
    anonymous = getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", None))
    if anonymous is None or not hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous)


def _advise(mapping: mmap.mmap, advice: str) -> None:
    """`mapping.madvise(mmap.<advice>)` where the system has both (no madvise on Windows); advice
    only, so nothing is lost without it."""
    if hasattr(mapping, "madvise") and hasattr(mmap, advice):
        mapping.madvise(getattr(mmap, advice))


class AnonymousBuffer:
    """Page-aligned anonymous memory that weights are read into. `huge_pages` for the stream
    buffers (`readahead`): a few, reused every pass, so faulting them in as huge pages happens once,
    and each read into them then reaches the disk in requests of up to the device's largest
    (a request holds a bounded number of memory segments, and a 4 KB page is one segment).

    Not mlock'ed: where it is permitted at all (RLIMIT_MEMLOCK is 8 MB for ordinary users on most
    Linux systems), locked pages cannot be reclaimed, so a budget set too high ends in the OOM
    killer instead of swapping; and what the plan keeps in RAM is already sized to fit.
    """

    def __init__(self, size: int, *, huge_pages: bool = False):
        self._map = _anonymous_memory(max(size, 1))
        if huge_pages:  # advice only: the pages stay 4 KB where the system has no huge pages
            _advise(self._map, "MADV_HUGEPAGE")
        self.size = size
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    def memoryview(self) -> memoryview:
        return memoryview(self._map)

    @property
    def address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))


class FaultingIn:
    """Faults the pages of `buffers` in, in order, on a thread of its own (Linux ≥ 5.14:
    madvise(MADV_POPULATE_WRITE), which leaves a page already written as it is, so it may race
    with reads into the buffers). A fresh page is otherwise faulted in, and zeroed, inside the
    read that first lands on it, one read at a time; on its own thread that work overlaps the
    disk's. Where the system cannot, it does nothing. The buffers stay mapped until it is done
    or `stop()`ped."""

    def __init__(self, buffers: Sequence[AnonymousBuffer]):
        self._buffers, self._stopping = list(buffers), threading.Event()
        self._thread = None
        madvise = _libc_madvise()
        if madvise is None:
            self._buffers = []
        elif self._buffers:
            self._thread = threading.Thread(target=self._fault_in, args=(madvise,), name="bloomconv-fault-in",
                                            daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        """Whether a thread was started (False where the system cannot fault pages in ahead)."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        return self.started and self._thread.is_alive()

    def _fault_in(self, madvise) -> None:
        try:
            for buffer in self._buffers:
                base = buffer.address
                for offset in range(0, buffer.size, FAULT_IN_STEP):
                    if self._stopping.is_set() or madvise(base + offset, min(FAULT_IN_STEP, buffer.size - offset),
                                                          MADV_POPULATE_WRITE):
                        return  # stopped, or refused (an older kernel): the reads fault the pages in
        finally:
            self._buffers = []

    def stop(self) -> None:
        """Stop after the step in progress and wait for it."""
        self._stopping.set()
        self.join()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14
FAULT_IN_STEP = 64 << 20


@functools.cache
def _libc_madvise():
    """libc's madvise through ctypes, which releases the GIL while it runs (Python's
    mmap.madvise does not); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise
