"""Reading and writing the safetensors container, streaming.

Why not `safetensors.torch.save_file`: it serialises the whole file in memory (a copy per tensor,
then the joined buffer), which would cost twice the largest output file of anonymous memory. This
writer streams each tensor's bytes straight from its (often memory-mapped) storage to disk and
hashes them on the way, so the file is read back never. A tensor may also be a `StreamedTensor`,
whose bytes are computed piece by piece as they are written (a quantized weight: never all of it
in memory). The byte format is the safetensors spec; tests read every file we write with
`safetensors.safe_open`.

The header reader is strict: it is what `verify --fast` and the runtime's load-time check use on
files that may have been damaged in transfer.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows: no O_DIRECT either
    fcntl = None

from .errors import HeaderError
from .format import SAFETENSORS_DTYPES, dtype_name
from .manifest import is_unicode

if TYPE_CHECKING:  # the reader runs in `verify`, which should not pay for importing torch
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
WRITE_CHUNK_BYTES = 16 * 1024 * 1024
WRITE_BUFFERS = 4          # in turn: up to three writes in flight while this thread fills one
DIRECT_ALIGNMENT = 4096    # O_DIRECT writes: offsets and lengths a multiple of the logical block size
DATA_ALIGNMENT = 64
_TORCH_NAME_TO_ST = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def st_dtype(dtype: "torch.dtype") -> str:
    """The safetensors code of a torch dtype, e.g. torch.bfloat16 -> "BF16"."""
    return _TORCH_NAME_TO_ST[dtype_name(dtype)]


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors code, e.g. "BF16" -> torch.bfloat16."""
    import torch
    return getattr(torch, SAFETENSORS_DTYPES[code][0])


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Raises HeaderError for anything that is not a well-formed file whose offsets exactly tile
    its data section.
    """
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:
            raise HeaderError(path, f"file is {file_size} bytes, shorter than the 8-byte length prefix")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise HeaderError(path, f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
        if 8 + header_len > file_size:
            raise HeaderError(path, f"header length {header_len} runs past the end of the {file_size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also an integer of 4300+ digits
        raise HeaderError(path, f"header is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise HeaderError(path, "header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise HeaderError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise HeaderError(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_len
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            raise HeaderError(path, f"tensor {info.name!r} starts at byte {info.begin}, expected {cursor} "
                                    "(gap or overlap between tensors)")
        cursor = info.end
    if cursor != data_size:
        raise HeaderError(path, f"tensors cover {cursor} data bytes but the file holds {data_size} "
                                "(truncated or padded file)")
    return SafetensorsHeader(tensors, dict(metadata), 8 + header_len, file_size)


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(path, f"entry for {name!r} is not an object")
    if not is_unicode(name):
        raise HeaderError(path, f"tensor name {name!r} is not valid Unicode (a lone surrogate)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise HeaderError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise HeaderError(path, f"tensor {name!r} has invalid shape {shape!r}")
    if math.prod(max(d, 1) for d in shape) >= 2**63:  # even with no elements, torch needs int64 strides
        raise HeaderError(path, f"tensor {name!r} has shape {shape}, too large to index")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise HeaderError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise HeaderError(path, f"tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, "
                                f"offsets give {offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


@dataclasses.dataclass(frozen=True)
class StreamedTensor:
    """A tensor the writer takes piece by piece: `dtype` and `shape` for the header, and `pieces()`,
    its bytes in row-major order. Each piece is copied before the next is asked for, so a producer
    may refill one buffer, and learns that the writer is done with a piece when asked for the next."""

    dtype: "torch.dtype"
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[memoryview]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def _element_size(dtype: "torch.dtype") -> int:
    return SAFETENSORS_DTYPES[st_dtype(dtype)][1]


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous."""
    import torch
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def encode_header(tensors: "list[tuple[str, torch.Tensor | StreamedTensor]]",
                  metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors:
        nbytes = math.prod(tensor.shape) * _element_size(tensor.dtype)
        header[name] = {"dtype": st_dtype(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The data section starts 64-byte aligned (the spec needs 8): fused kernels such as
    # torch._weight_int8pack_mm need their weight on a 16-byte boundary to run from the mmap.
    encoded += b" " * (-(len(encoded) + 8) % DATA_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(file, tensors: "list[tuple[str, torch.Tensor | StreamedTensor]]",
                      metadata: dict[str, str] | None = None) -> tuple[int, str]:
    """Write `tensors` in order to the open binary `file`; return (bytes written, sha256 hex).

    The header and the data go through page-aligned bounce buffers (`_Sink`): this thread copies
    and hashes one while writer threads write the others (hashlib and write() release the GIL).
    Writing straight from a memory-mapped source is slower: its page faults are taken inside the
    write path.
    """
    with _Sink(file) as sink:
        sink.put(memoryview(encode_header(tensors, metadata)))
        for name, tensor in tensors:
            written = sum(sink.put(data) for data in _pieces(tensor))
            expected = math.prod(tensor.shape) * _element_size(tensor.dtype)
            if written != expected:
                raise ValueError(f"{name}: {written} bytes streamed, its shape and dtype take {expected}")
        return sink.finish()


class _Sink:
    """Bytes in, gathered into WRITE_BUFFERS bounce buffers in turn, each hashed and written at its
    place in the file once full.

    Where `file` has a descriptor the buffers are written with pwrite on two writer threads, and,
    where the filesystem takes it (Linux, not tmpfs), with O_DIRECT: on the 2-core machine of
    bench/, writing through the page cache cost 1.4 s of CPU per GB (copy, page allocation,
    reclaim), direct writes 0.13 s, and the output does not fill the page cache (commit's fsync
    still makes it durable). The file's last, partial page is written through the page cache.
    A file object without a descriptor gets plain sequential writes on one thread.
    """

    def __init__(self, file):
        self._file = file
        try:
            self._fd = file.fileno()
            file.flush()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            self._fd = None
        self._direct = self._fd is not None and _set_direct(self._fd, True)
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1 if self._fd is None else 2, thread_name_prefix="write")
        self._buffers = [memoryview(mmap.mmap(-1, WRITE_CHUNK_BYTES)) for _ in range(WRITE_BUFFERS)]
        self._in_flight: list[concurrent.futures.Future | None] = [None] * WRITE_BUFFERS
        self._turn = 0        # the buffer being filled
        self._filled = 0      # bytes in it
        self._offset = 0      # where it goes in the file
        self._digest = hashlib.sha256()

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._wait(range(WRITE_BUFFERS))
        finally:
            self._pool.shutdown(wait=True)
            if self._direct:
                _set_direct(self._fd, False)

    def put(self, data: memoryview) -> int:
        """Copy `data` in (writing each buffer that fills); returns its length."""
        start = 0
        while start < len(data):
            if self._filled == 0:
                self._wait([self._turn])  # its previous write is done (or raise what it met)
            step = min(WRITE_CHUNK_BYTES - self._filled, len(data) - start)
            self._buffers[self._turn][self._filled:self._filled + step] = data[start:start + step]
            self._filled, start = self._filled + step, start + step
            if self._filled == WRITE_CHUNK_BYTES:
                self._write()
        return len(data)

    def finish(self) -> tuple[int, str]:
        """Write what is left; (bytes in the file, sha256 hex)."""
        self._write()
        return self._offset, self._digest.hexdigest()

    def _wait(self, turns) -> None:
        for turn in turns:
            future, self._in_flight[turn] = self._in_flight[turn], None
            if future is not None:
                future.result()

    def _write(self) -> None:
        chunk = self._buffers[self._turn][:self._filled]
        self._digest.update(chunk)
        if len(chunk) % DIRECT_ALIGNMENT and self._direct:  # the file's tail: after every other write
            self._wait(range(WRITE_BUFFERS))
        self._in_flight[self._turn] = self._pool.submit(self._write_at, chunk, self._offset)
        self._offset += len(chunk)
        self._turn, self._filled = (self._turn + 1) % WRITE_BUFFERS, 0

    def _write_at(self, chunk: memoryview, offset: int) -> None:
        if self._fd is None:
            self._file.write(chunk)
            return
        if len(chunk) % DIRECT_ALIGNMENT and self._direct:  # the last write: no other is in flight
            self._stop_direct()
        while chunk:
            try:
                written = os.pwrite(self._fd, chunk, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._stop_direct()  # the filesystem took the flag but not the write: through the page cache
                continue
            chunk, offset = chunk[written:], offset + written

    def _stop_direct(self) -> None:
        with self._lock:
            if self._direct and not _set_direct(self._fd, False):
                raise OSError(errno.EINVAL, "cannot turn O_DIRECT off", self._file.name)
            self._direct = False


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether that worked."""
    if not hasattr(os, "O_DIRECT") or fcntl is None:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


def _pieces(tensor: "torch.Tensor | StreamedTensor") -> Iterator[memoryview]:
    """A tensor's bytes, as unsigned-byte views (what the bounce buffers take)."""
    if not isinstance(tensor, StreamedTensor):
        yield tensor_bytes(tensor)
        return
    for piece in tensor.pieces():
        piece = memoryview(piece)
        yield piece if piece.format == "B" and piece.ndim == 1 else piece.cast("B")
