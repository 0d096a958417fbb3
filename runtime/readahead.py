"""Read-ahead of streamed files, one piece at a time, into STREAM_BUFFERS buffers of at most about
STREAM_PIECE_BYTES: the memory streaming takes is bounded by these constants, not by any file.

A piece is a row range of one matrix of a file (its stored tensors' rows: int8 rows and their
scales; 4-bit packed rows and the absmax of their blocks), as many rows as fit in
STREAM_PIECE_BYTES, cut where the weight's `row_multiple` allows (multiples of ROW_MULTIPLE rows;
for 4-bit weights whole blocks, `StoredWeight.row_slice`). A matrix no larger than that is one
piece. The pieces of all streamed files form one cycle in the order a forward pass multiplies by
them (blocks, then the embedding matrix as the tied lm_head). A `StreamedWeight` computes its
product piece by piece (the output features are the concatenation over its row ranges): bit for
bit the product of the whole matrix where the compiled kernels multiply (fp32 sums row by row),
to within rounding where a large batch goes to torch's GEMM (a 4-bit or a bf16 prefill), whose
summation order may depend on the matrix's shape. Pieces the residency plan pins (`residency`)
are read once like a pinned file and leave the cycle.
Layer norms and biases of a streamed file, and the few embedding rows a step looks up, are read
through the file mapping: a few pages, not the file.

The reader thread keeps the next STREAM_BUFFERS pieces of the cycle read or being read: when the
forward pass is done with a piece, its buffer is refilled at once with the one after, wrapping to
the next pass, so the disk never waits for the CPU and a decoding step starts with its first
pieces already in memory.

>>> stream = ReadAhead(reader, files, pieces, buffer_bytes, STREAM_BUFFERS)   # doctest: +SKIP
>>> with stream.take(0) as weight:                                          # doctest: +SKIP
...     out = weight.matmul(x)
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from bloomconv.storage import StoredWeight
from bloomconv.storage.base import map_tensors, weight_tensors

from .files import PAGE, AnonymousBuffer, MappedFile, Span
from .records import UnitBytes, aligned

__all__ = ["Piece", "ReadAhead", "STREAM_BUFFERS", "STREAM_PIECE_BYTES", "StreamedUnit", "StreamedWeight",
           "Taker", "plan_pieces"]

# 64 MiB pieces, 3 buffers: one being multiplied, one being read, one read ahead to absorb the
# jitter of either; 192 MiB of buffers whatever the model. A piece takes ~0.1 s to read from a
# 1 GB/s disk, long enough that the per-piece work (a read call, a kernel launch) is negligible.
STREAM_PIECE_BYTES = 64 << 20
STREAM_BUFFERS = 3

# gives one piece's weight for the duration of a `with` (`ReadAhead.take`, or a pinned piece's)
Taker = Callable[[], contextlib.AbstractContextManager[StoredWeight]]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, end) of the matrix `module` of the file of `unit`: the byte `spans` to read
    and the buffer bytes the piece takes (`nbytes`); `weight` is those rows over the file's
    layout (meta tensors: nothing read), from which `placed` builds the same record over the
    buffer. `copies`: (where read, where placed, bytes) of each tensor whose bytes do not start at
    a multiple of its item size in the file, copied after the read to an aligned place."""

    unit: str
    module: str
    rows: tuple[int, int]
    spans: tuple[Span, ...]
    nbytes: int
    weight: StoredWeight = dataclasses.field(repr=False, compare=False)
    copies: tuple[tuple[int, int, int], ...] = ()

    def read_into(self, file: MappedFile, buffer: AnonymousBuffer, *, streaming: bool) -> StoredWeight:
        """Read the piece from `file` into `buffer` (of at least `nbytes`); its rows there."""
        file.read_spans(buffer.memoryview(), self.spans, streaming=streaming)
        return self.placed(file, buffer.tensor)

    def placed(self, file: MappedFile, memory: torch.Tensor) -> StoredWeight:
        """The rows as views of `memory` (uint8), once `spans` have been read into it; a tensor of
        the layout that is not a meta tensor (a small one, read through the mapping) stays as is."""
        copied = {read: placed for read, placed, _ in self.copies}
        for read, placed, size in self.copies:
            memory[placed:placed + size].copy_(memory[read:read + size])

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.is_meta:
                return tensor
            begin = _buffer_offset(self.spans, file.file_offset(tensor))
            begin = copied.get(begin, begin)
            return memory[begin:begin + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        return map_tensors(self.weight, moved)


def _buffer_offset(spans: Sequence[Span], offset: int) -> int:
    start, _, at = next(span for span in spans if span[0] <= offset < span[0] + span[1])
    return at + offset - start


def plan_pieces(file: MappedFile, unit: str, modules: Sequence[str], piece_bytes: int) -> list[Piece]:
    """The pieces of the matrices `modules` of `file`, in that order, each about `piece_bytes` at
    most (one granule of rows, `row_multiple`, where that is more). Reads nothing but the small
    tensors a weight is decoded from (a 4-bit state blob)."""
    layout = file.layout()
    pieces = []
    for module in modules:
        weight = layout.weight(module)
        rows = weight.shape[0]
        step = weight.row_multiple
        total = sum(size for _, size, _ in _extents(file, weight))
        count = max(1, min(math.ceil(total / piece_bytes), math.ceil(rows / step)))
        take = math.ceil(rows / count / step) * step  # pieces of nearly equal size
        for start in range(0, rows, take):
            part = weight.row_slice(start, min(start + take, rows))
            extents = _extents(file, part)
            spans = _spans(extents)
            nbytes = sum(length for _, length, _ in spans)
            copies = []
            for offset, size, itemsize in extents:
                if offset % itemsize:  # misaligned in the file, so in the buffer: copy it to an aligned place
                    nbytes = aligned(nbytes)
                    copies.append((_buffer_offset(spans, offset), nbytes, size))
                    nbytes += size
            pieces.append(Piece(unit, module, (start, min(start + take, rows)), spans, nbytes, part, tuple(copies)))
    return pieces


def _extents(file: MappedFile, weight: StoredWeight) -> list[tuple[int, int, int]]:
    """(file offset, bytes, item size) of each meta tensor of `weight` (the rest is small and read
    through the mapping)."""
    found = {}
    for tensor in weight_tensors(weight):
        if tensor.is_meta and tensor.numel():
            if not tensor.is_contiguous():
                raise ValueError(f"{file.path.name}: a row slice of a stored tensor is not contiguous")
            found[file.file_offset(tensor)] = (tensor.numel() * tensor.element_size(), tensor.element_size())
    return [(offset, size, itemsize) for offset, (size, itemsize) in sorted(found.items())]


def _spans(extents: Sequence[tuple[int, int, int]]) -> tuple[Span, ...]:
    """Whole pages covering each extent, overlapping ones merged, laid out one after another in
    the buffer."""
    merged: list[list[int]] = []
    for offset, size, _ in extents:
        first, last = offset // PAGE * PAGE, -(-(offset + size) // PAGE) * PAGE
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    spans, at = [], 0
    for first, last in merged:
        spans.append((first, last - first, at))
        at += last - first
    return tuple(spans)


class ReadAhead:
    """The reader of a cycle of pieces: `take(i)` gives piece i's weight once read; the pieces
    must be taken in cycle order (a pass that stops part-way is resynchronised, at the cost of
    waiting for the reads in flight)."""

    def __init__(self, reader: concurrent.futures.Executor, files: dict[str, MappedFile], pieces: Sequence[Piece],
                 buffer_bytes: int, buffers: int):
        self.pieces = tuple(pieces)
        self._reader, self._files = reader, files
        self._buffers = [AnonymousBuffer(buffer_bytes, huge_pages=True) for _ in range(buffers if self.pieces else 0)]
        self._free = list(self._buffers)
        self._reads: dict[int, tuple[concurrent.futures.Future, AnonymousBuffer]] = {}
        self._next = 0  # the next piece of the cycle to read
        self._fill()

    def _read(self, index: int, buffer: AnonymousBuffer) -> StoredWeight:
        piece = self.pieces[index]
        return piece.read_into(self._files[piece.unit], buffer, streaming=True)

    def _fill(self) -> None:
        """Queue the next pieces of the cycle into every free buffer."""
        while self._free:
            index = self._next % len(self.pieces)
            if index in self._reads:
                return  # fewer pieces than buffers: each is queued already
            buffer = self._free.pop()
            self._reads[index] = (self._reader.submit(self._read, index, buffer), buffer)
            self._next += 1

    def _restart_at(self, index: int) -> None:
        for pending, _ in self._reads.values():
            with contextlib.suppress(Exception):
                pending.result()
        self._reads.clear()
        self._free = list(self._buffers)
        self._next = index
        self._fill()

    @contextlib.contextmanager
    def take(self, index: int) -> Iterator[StoredWeight]:
        """Piece `index`'s rows, valid inside the `with`: its buffer is refilled as soon as it exits."""
        if index not in self._reads:
            self._restart_at(index)
        pending, buffer = self._reads.pop(index)
        try:
            yield pending.result()
        finally:
            self._free.append(buffer)
            self._fill()


class StreamedWeight:
    """A matrix of a streamed file, multiplied piece by piece (`parts`: each piece's rows and how to
    take its weight — `ReadAhead.take` of its place in the cycle, or its pinned copy — in row order).
    `rows` and `dequantize` read the file mapping (`whole`, decoded when first needed)."""

    def __init__(self, shape: tuple[int, int], parts: tuple[tuple[tuple[int, int], Taker], ...], whole):
        self.shape, self.parts, self._whole = shape, parts, whole

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        out = None
        for (start, end), take in self.parts:
            with take() as weight:
                part = weight.matmul(x, products)                                        # (..., end - start)
            if len(self.parts) == 1:
                return part
            if out is None:
                out = part.new_empty(*x.shape[:-1], self.shape[0])                       # (..., out)
            out[..., start:end] = part
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._whole().rows(ids, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._whole().dequantize(dtype)


class StreamedUnit(UnitBytes):
    """A streamed file's tensors for a forward pass: small ones (layer norms, biases) from the file
    mapping, its matrices as StreamedWeights (`parts`: module -> its pieces' rows and takers)."""

    def __init__(self, file: MappedFile, parts: dict[str, tuple[tuple[tuple[int, int], Taker], ...]]):
        super().__init__({}, file.quant)
        self._file, self._parts = file, parts

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self._file.view().tensors

    def get(self, name: str) -> torch.Tensor | None:
        return self._file.view().get(name)

    def weight(self, module: str) -> StoredWeight:
        if module not in self._parts:
            return self._file.view().weight(module)
        shape = self._file.layout().weight(module).shape
        return StreamedWeight(shape, self._parts[module], lambda: self._file.view().weight(module))
