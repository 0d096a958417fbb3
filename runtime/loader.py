"""Open a bloomconv directory for running: check it, plan what stays in RAM, read weights ahead.

Start-up reads the manifest, the safetensors headers and the tokenizer, then returns; weight
bytes are read by one background thread, in the order the forward pass uses them.

Residency. A RAM budget (`ram_budget`, bytes of weights held in memory) splits the files into

    pinned    read once into anonymous memory (mlock'ed where permitted), kept for the process's
              life: page-cache reclaim cannot evict them, a token never rereads them;
    streamed  read again for every forward pass into one of STREAM_BUFFERS reusable anonymous
              buffers, around the page cache (O_DIRECT on Linux, F_NOCACHE on macOS; where
              refused, buffered reads with each chunk dropped behind by
              `posix_fadvise(DONTNEED)` where the system has it), so a model larger than RAM
              costs (model − pinned) bytes of disk per token and evicts nothing else.

The budget covers the pinned files plus the stream buffers. The ln_f and embedding files are
pinned first (used every token, the embeddings twice), then as many blocks as fit, chosen
evenly spaced, so that while one streamed block is read the pinned blocks before it compute.
16-bit weights stay 16-bit in RAM: the dense kernel (bloomconv/kernels/csrc/dense.c) multiplies them
in fp32 at the speed it reads them. Only where it was not built, and the whole model fits the
budget even in float32 and computes in float32, are they widened once at load (`plan_residency`)
for torch's fp32 GEMM.

Read-ahead. The reader thread keeps the next STREAM_BUFFERS streamed files, in cyclic use order,
read or being read: when the forward pass finishes with a streamed file its buffer is refilled
at once with the one after, wrapping to the next pass, so the disk never waits for the CPU and a
decode step starts with its first streamed block already in memory. Reads are large sequential
`preadv` calls (plain seek-and-read where the system lacks it), which release the GIL while
torch computes.

Portability: every Linux-only call has a fallback, so the runtime runs on macOS too: no O_DIRECT
(F_NOCACHE, or buffered reads), no transparent huge pages (plain anonymous memory), no mlock (the
pinned files stay in RAM unless the system swaps them), no /proc (psutil's available memory;
see `bloomconv.process_stats`).

Tensors are views of those buffers: no copy per access. A view of a streamed file is valid only
inside its `use` block.

>>> checkpoint = open_checkpoint("bloom-560m-blocks", ram_budget="800MB")   # doctest: +SKIP
>>> checkpoint.residency.streamed                                          # doctest: +SKIP
('block_000', 'block_002', 'block_004', …)
>>> with checkpoint.use("block_000") as source:                            # doctest: +SKIP
...     block_weights(source, 0).query_key_value.weight.shape
(3072, 1024)
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import io
import json
import math
import mmap
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch

from bloomconv import kernels
from bloomconv.errors import ManifestError, SourceError, VerificationError
from bloomconv.format import (CONFIG_NAME, EMBEDDINGS_UNIT, FINAL_UNIT, MANIFEST_NAME, NARROW_FLOAT_DTYPES, PREFIX,
                              QuantType, TOKENIZER_NAMES, block_unit)
from bloomconv.geometry import Geometry
from bloomconv.manifest import Manifest, read_manifest
from bloomconv.process_stats import available_memory
from bloomconv.safetensors_io import SafetensorsHeader, read_header, torch_dtype
from bloomconv.storage import StoredWeight, decode_module

__all__ = ["BlockWeights", "Checkpoint", "EmbeddingWeights", "LayerNormWeights", "LinearWeights",
           "MappedFile", "Residency", "STREAM_BUFFERS", "UnitBytes", "VERIFY_MODES", "available_memory",
           "block_weights", "default_ram_budget", "embedding_weights", "final_weights", "open_checkpoint",
           "parse_size", "plan_residency"]

VERIFY_MODES = ("fast", "full")
STREAM_BUFFERS = 2           # one file computing, the next being read
READ_CHUNK_BYTES = 16 << 20  # per preadv call; the page cache of a streamed file is dropped per chunk
# macOS's "no caching on this descriptor" (the <sys/fcntl.h> value where Python does not name it)
F_NOCACHE = getattr(fcntl, "F_NOCACHE", 48) if sys.platform == "darwin" else None
# Default budget: this share of available memory, minus the working set and a KV cache reserve.
DEFAULT_BUDGET_SHARE = 0.9
KV_RESERVE_TOKENS = 1024
RUNTIME_OVERHEAD_BYTES = 256 << 20  # interpreter, torch, tokenizer, allocator slack
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


# ------------------------------------------------------------------------------ weight records

def _in_dtype(cache: dict, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, converted once per record and kept in its `cache`: a pinned file's
    records live as long as it, so its small vectors are not converted again every token (~200
    conversions of bf16 layer-norm weights and biases per bloom-560m decoding step in fp32)."""
    if (key, dtype) not in cache:
        cache[key, dtype] = tensor.to(dtype)
    return cache[key, dtype]


@dataclasses.dataclass(frozen=True)
class LayerNormWeights:
    weight: torch.Tensor  # (hidden,)
    bias: torch.Tensor    # (hidden,)
    _converted: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to(self, device) -> "LayerNormWeights":
        return LayerNormWeights(self.weight.to(device), self.bias.to(device))

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) in `dtype`, converted once."""
        return (_in_dtype(self._converted, "weight", self.weight, dtype),
                _in_dtype(self._converted, "bias", self.bias, dtype))


@dataclasses.dataclass(frozen=True)
class LinearWeights:
    weight: StoredWeight  # (out, in), in whatever storage the file has
    bias: torch.Tensor    # (out,)
    _converted: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def bias_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias in `dtype`, converted once."""
        return _in_dtype(self._converted, "bias", self.bias, dtype)


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    input_layernorm: LayerNormWeights
    query_key_value: LinearWeights
    dense: LinearWeights
    post_attention_layernorm: LayerNormWeights
    dense_h_to_4h: LinearWeights
    dense_4h_to_h: LinearWeights


@dataclasses.dataclass(frozen=True)
class EmbeddingWeights:
    word_embeddings: StoredWeight  # (vocab, hidden); also the tied lm_head
    layernorm: LayerNormWeights


class UnitBytes:
    """The tensors of one safetensors file by name: views of its bytes (a mapping or a buffer),
    with the storage type the manifest records for each (`quant`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], quant: dict[str, QuantType]):
        self.tensors = tensors
        self.quant = quant
        self._records: dict = {}

    def records(self, key, build):
        """`build()`'s weight records over these views, built once per UnitBytes: a pinned file's
        records (parsed 4-bit state, int8 row scales) then live as long as its bytes instead of
        being rebuilt every token."""
        if key not in self._records:
            self._records[key] = build()
        return self._records[key]

    @classmethod
    def parse(cls, header: SafetensorsHeader, data: torch.Tensor, quant: dict[str, QuantType]) -> "UnitBytes":
        """Views of `data` (uint8, the whole file) where `header` places each tensor."""
        tensors = {}
        for name, info in header.tensors.items():
            dtype = torch_dtype(info.dtype)
            start = header.data_start + info.begin
            raw = data[start:header.data_start + info.end]
            if start % dtype.itemsize:
                raw = raw.clone()  # misaligned (after an odd-sized blob): small state tensors only
            tensors[name] = raw.view(dtype).reshape(info.shape)
        return cls(tensors, quant)

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def to(self, device: torch.device) -> "UnitBytes":
        """Copies on `device`, queued on the current stream (see Transformer._on_device)."""
        return UnitBytes({name: t.to(device, non_blocking=True) for name, t in self.tensors.items()}, self.quant)

    def weight(self, module: str) -> StoredWeight:
        """The matrix `<module>.weight`, decoded by the storage type its manifest entry names."""
        name = f"{module}.weight"
        if name not in self.quant:
            raise SourceError(name, "is not listed in the manifest",
                              "The directory is damaged; verify it and copy the named file again.")
        return decode_module(module, self.quant[name], self.get)

    def widened(self) -> tuple["UnitBytes", "AnonymousBuffer"]:
        """A copy in one new buffer with 16-bit float tensors as float32 (quantized data and its
        fp32 state unchanged): the form fp32 compute multiplies fastest, at up to twice the RAM."""
        buffer = AnonymousBuffer(sum(_aligned(_widened_bytes(t)) for t in self.tensors.values()))
        tensors, offset = {}, 0
        for name, tensor in self.tensors.items():
            dtype = torch.float32 if _is_narrow_float(tensor) else tensor.dtype
            size = _widened_bytes(tensor)
            tensors[name] = buffer.tensor[offset:offset + size].view(dtype).view(tensor.shape).copy_(tensor)
            offset += _aligned(size)  # every tensor 64-byte aligned, as fused kernels want
        return UnitBytes(tensors, self.quant), buffer


def _is_narrow_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.bfloat16, torch.float16)


def _widened_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * (4 if _is_narrow_float(tensor) else tensor.element_size())


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


def embedding_weights(source: UnitBytes) -> EmbeddingWeights:
    return source.records("embeddings", lambda: EmbeddingWeights(
        source.weight(f"{PREFIX}word_embeddings"), _layer_norm(source, f"{PREFIX}word_embeddings_layernorm")))


def block_weights(source: UnitBytes, index: int) -> BlockWeights:
    module = f"{PREFIX}h.{index}"
    return source.records(("block", index), lambda: BlockWeights(
        input_layernorm=_layer_norm(source, f"{module}.input_layernorm"),
        query_key_value=_linear(source, f"{module}.self_attention.query_key_value"),
        dense=_linear(source, f"{module}.self_attention.dense"),
        post_attention_layernorm=_layer_norm(source, f"{module}.post_attention_layernorm"),
        dense_h_to_4h=_linear(source, f"{module}.mlp.dense_h_to_4h"),
        dense_4h_to_h=_linear(source, f"{module}.mlp.dense_4h_to_h"),
    ))


def final_weights(source: UnitBytes) -> LayerNormWeights:
    return source.records("final", lambda: _layer_norm(source, f"{PREFIX}ln_f"))


def _layer_norm(source: UnitBytes, module: str) -> LayerNormWeights:
    return LayerNormWeights(source.get(f"{module}.weight"), source.get(f"{module}.bias"))


def _linear(source: UnitBytes, module: str) -> LinearWeights:
    return LinearWeights(source.weight(module), source.get(f"{module}.bias"))


# ------------------------------------------------------------------------------------ files

class MappedFile:
    """One safetensors file: its header, an open descriptor, and a lazy read-only mapping.

    The mapping serves lookups that touch a few pages (embedding rows of a streamed file,
    inspecting weights outside a forward pass); whole-file use goes through `read_into`.
    """

    def __init__(self, path: Path, quant: dict[str, QuantType]):
        self.path = path
        self.quant = quant  # the manifest's storage type of each tensor
        self.header: SafetensorsHeader = read_header(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # O_BINARY: Windows
        self._uncached_fd: int | None | bool = None  # opened on first streamed read; False: not possible here
        self._mapping: mmap.mmap | None = None
        self._view: UnitBytes | None = None

    @property
    def size(self) -> int:
        return self.header.file_size

    @property
    def widened_size(self) -> int:
        """Bytes in RAM once 16-bit float tensors are widened to float32 (`UnitBytes.widened`)."""
        total = 0
        for info in self.header.tensors.values():
            itemsize = 4 if info.dtype in NARROW_FLOAT_DTYPES else torch_dtype(info.dtype).itemsize
            total += _aligned(math.prod(info.shape) * itemsize)
        return total

    def view(self) -> UnitBytes:
        """The tensors as views of the file mapping (pages come in as they are touched)."""
        if self._view is None:
            # ACCESS_COPY: a private mapping torch can wrap without a read-only warning; nothing
            # writes to it, so its pages stay shared with the page cache.
            self._mapping = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            self._view = UnitBytes.parse(self.header, torch.frombuffer(self._mapping, dtype=torch.uint8), self.quant)
        return self._view

    def widened(self) -> tuple[UnitBytes, "AnonymousBuffer"]:
        """`UnitBytes.widened` straight from the page cache (no copy of the file in between),
        then the mapping's pages are let go (they stay cached, shared, out of this process)."""
        view = self.view()
        _advise(self._mapping, "MADV_WILLNEED")
        try:
            return view.widened()
        finally:
            _advise(self._mapping, "MADV_DONTNEED")

    def read_into(self, buffer: "AnonymousBuffer", streaming: bool) -> UnitBytes:
        """Read the whole file into `buffer` (of at least `padded_size` bytes) with large sequential reads.

        `streaming`: the file is read again every pass, so keep it out of the page cache (it must
        not evict pinned or other useful pages, nor count twice against a cgroup limit): read with
        O_DIRECT (F_NOCACHE on macOS), which also spares the CPU the copy out of the page cache (on
        two cores that copy stalls torch's threads), or where that is refused drop each chunk
        behind (where the system has posix_fadvise; elsewhere the page cache keeps what it reads).
        """
        if streaming and self._uncached_fd is None:
            fd = _open_uncached(self.path)
            self._uncached_fd = False if fd is None else fd
        uncached = streaming and self._uncached_fd is not False
        fd = self._uncached_fd if uncached else self._fd
        if not uncached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        view = buffer.memoryview()
        done = 0
        while done < self.size:
            # O_DIRECT reads whole pages: the last one runs past the end of the file (returns short)
            end = min(done + READ_CHUNK_BYTES, self.padded_size if uncached else self.size)
            n = _read_at(fd, view[done:end], done)
            if n <= 0:
                raise VerificationError(self.path.parent, [f"{self.path.name}: truncated while running "
                                                           f"({done} of {self.size} bytes)"])
            if streaming and not uncached and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, done, n, os.POSIX_FADV_DONTNEED)
            done += n
        return UnitBytes.parse(self.header, buffer.tensor[:self.size], self.quant)

    @property
    def padded_size(self) -> int:
        return _whole_pages(self.size)

    def close(self) -> None:
        os.close(self._fd)
        if self._uncached_fd:
            os.close(self._uncached_fd)


def _open_uncached(path: Path) -> int | None:
    """A descriptor whose reads bypass the page cache: O_DIRECT (Linux; whole, aligned pages) or
    F_NOCACHE (macOS). None where the system has neither or the filesystem refuses (tmpfs…)."""
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
        try:
            _read_at(fd, memoryview(_anonymous_memory(mmap.PAGESIZE)), 0)  # page-aligned
        except OSError:  # some filesystems accept the flag at open and refuse the read
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
    system has the flags (all but Windows): shared anonymous memory is shmem, which gets no
    transparent huge pages and is reported as RssShmem instead of RssAnon."""
    anonymous = getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", None))
    if anonymous is None or not hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous)


def _advise(mapping: mmap.mmap, advice: str) -> None:
    """`mapping.madvise(mmap.<advice>)` where the system has both (no madvise on Windows, no
    MADV_HUGEPAGE outside Linux); advice only, so nothing is lost without it."""
    if hasattr(mapping, "madvise") and hasattr(mmap, advice):
        mapping.madvise(getattr(mmap, advice))


class AnonymousBuffer:
    """Page-aligned anonymous memory (transparent huge pages where offered), optionally mlock'ed."""

    def __init__(self, size: int):
        self._map = _anonymous_memory(max(size, 1))
        _advise(self._map, "MADV_HUGEPAGE")  # fewer TLB misses when a matmul sweeps the weights
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.locked = False

    def memoryview(self) -> memoryview:
        return memoryview(self._map)

    def lock(self) -> bool:
        """Keep the pages in RAM even under swap pressure; False where not permitted (RLIMIT_MEMLOCK)
        or there is no C library mlock to call (Windows)."""
        try:
            mlock = ctypes.CDLL(None, use_errno=True).mlock
        except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL needs a library name
            return False
        self.locked = mlock(ctypes.c_void_p(self.tensor.data_ptr()), ctypes.c_size_t(len(self._map))) == 0
        return self.locked


# ------------------------------------------------------------------------------ RAM budget

def parse_size(size: str | int) -> int:
    """Bytes from an int or a string such as "12GB", "800MB", "1.5GiB", "4096" (kB/MB/GB powers
    of 1000; KiB/MiB/GiB powers of 1024; the B is optional).

    >>> parse_size("1.5GiB"), parse_size("800MB"), parse_size("12g"), parse_size(0)
    (1610612736, 800000000, 12000000000, 0)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"a size must not be negative, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read {size!r} as a size; write it like 12GB, 800MB, 1.5GiB or a byte count")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def default_ram_budget(geometry: Geometry, dtype: torch.dtype, available: int | None = None) -> int:
    """The rule when no budget is given: DEFAULT_BUDGET_SHARE of `available_memory()`, minus

    - the working set of one block: its largest matrix in the compute dtype (what a 4-bit
      matmul dequantizes) plus RUNTIME_OVERHEAD_BYTES, and
    - the KV cache of KV_RESERVE_TOKENS tokens at batch 1 in the compute dtype,

    never below zero (then every file streams).
    """
    available = available_memory() if available is None else available
    h, itemsize = geometry.hidden_size, dtype.itemsize
    working_set = 4 * h * h * itemsize + RUNTIME_OVERHEAD_BYTES
    kv_reserve = 2 * geometry.n_layer * h * KV_RESERVE_TOKENS * itemsize
    return max(0, int(DEFAULT_BUDGET_SHARE * available) - working_set - kv_reserve)


@dataclasses.dataclass(frozen=True)
class Residency:
    """Which files stay in RAM and which are read every forward pass, under `budget` bytes."""

    budget: int
    pinned: tuple[str, ...]    # units, in load order
    streamed: tuple[str, ...]  # units, in use order
    pinned_bytes: int          # in RAM, after widening
    buffer_bytes: int          # each of the STREAM_BUFFERS buffers (0 when nothing streams)
    widened: bool = False      # pinned 16-bit float tensors are held as float32

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held in RAM: pinned files plus the stream buffers."""
        return self.pinned_bytes + STREAM_BUFFERS * self.buffer_bytes


def plan_residency(sizes: dict[str, int], n_layer: int, budget: int,
                   widened_sizes: dict[str, int] | None = None) -> Residency:
    """Pin what fits in `budget` (final, embeddings, then evenly spaced blocks); stream the rest.

    When the whole model fits even with its 16-bit weights widened to float32 (`widened_sizes`,
    given for float32 compute without the dense kernel), it is pinned widened: torch's fp32 matmuls
    are faster than its bf16 ones or converting on the fly. Otherwise files are pinned as
    stored, so that the budget saves the most disk reads.

    Streaming needs STREAM_BUFFERS buffers of the largest streamed file whatever the budget, so
    a budget below that still runs, using that much.
    """
    blocks = [block_unit(i) for i in range(n_layer)]
    use_order = [*blocks, FINAL_UNIT, EMBEDDINGS_UNIT]
    load_order = (EMBEDDINGS_UNIT, *blocks, FINAL_UNIT)
    if widened_sizes is not None and sum(widened_sizes.values()) <= budget:
        return Residency(budget, load_order, (), sum(widened_sizes.values()), 0, widened=True)
    if sum(sizes.values()) <= budget:
        return Residency(budget, load_order, (), sum(sizes.values()), 0)
    block_size = max(sizes[b] for b in blocks)
    buffer = _whole_pages(block_size)
    pinned: set[str] = set()
    room = budget - STREAM_BUFFERS * buffer
    for unit in (FINAL_UNIT, EMBEDDINGS_UNIT):
        if sizes[unit] <= room:
            pinned.add(unit)
            room -= sizes[unit]
    if EMBEDDINGS_UNIT not in pinned and _whole_pages(sizes[EMBEDDINGS_UNIT]) > buffer:
        room -= STREAM_BUFFERS * (_whole_pages(sizes[EMBEDDINGS_UNIT]) - buffer)  # buffers sized for the embeddings
    n_streamed = n_layer - min(n_layer, max(0, room // block_size))
    streamed_blocks = {blocks[j * n_layer // n_streamed] for j in range(n_streamed)}  # evenly spaced
    pinned.update(b for b in blocks if b not in streamed_blocks)
    streamed = tuple(u for u in use_order if u not in pinned)
    return Residency(budget, tuple(u for u in load_order if u in pinned), streamed,
                     sum(sizes[u] for u in pinned), _whole_pages(max(sizes[u] for u in streamed)))


def _whole_pages(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


# ------------------------------------------------------------------------------ checkpoint

class Checkpoint:
    """A verified bloomconv directory with its weights being read. Build with `open_checkpoint`.

    `use(unit)` gives a file's tensors for one forward-pass step; `embeddings()`, `block(i)` and
    `final()` give typed weights for inspection (pinned: the RAM copy; streamed: the mapping).
    """

    def __init__(self, directory: Path, manifest: Manifest, config: dict, geometry: Geometry,
                 files: dict[str, MappedFile], tokenizer, residency: Residency):
        self.directory, self.manifest, self.config, self.geometry = directory, manifest, config, geometry
        self.files, self.tokenizer, self.residency = files, tokenizer, residency
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bloomconv-read")
        self._pinned: dict[str, concurrent.futures.Future] = {
            unit: self._reader.submit(self._read_pinned, unit) for unit in residency.pinned}
        n_buffers = STREAM_BUFFERS if residency.streamed else 0
        self._buffers = [AnonymousBuffer(residency.buffer_bytes) for _ in range(n_buffers)]
        self._free = list(self._buffers)
        # streamed unit -> (its read, the buffer it reads into)
        self._reads: dict[str, tuple[concurrent.futures.Future, AnonymousBuffer]] = {}
        self._next_read = 0  # index into residency.streamed of the next file to read, cyclically
        self._fill_stream_buffers()

    # -- reading

    def _read_pinned(self, unit: str) -> UnitBytes:
        if self.residency.widened:
            source, buffer = self.files[unit].widened()
        else:
            buffer = AnonymousBuffer(self.files[unit].size)
            source = self.files[unit].read_into(buffer, streaming=False)  # the page cache may keep a warm copy
        buffer.lock()
        return source

    def _fill_stream_buffers(self) -> None:
        """Queue the next streamed files (cyclic use order) into every free buffer."""
        streamed = self.residency.streamed
        while self._free:
            unit = streamed[self._next_read % len(streamed)]
            if unit in self._reads:
                return  # fewer streamed files than buffers: each is queued already
            buffer = self._free.pop()
            self._reads[unit] = (self._reader.submit(self.files[unit].read_into, buffer, streaming=True), buffer)
            self._next_read += 1

    def _restart_stream_at(self, unit: str) -> None:
        """Resynchronise the read-ahead after a forward pass stopped part-way (an exception)."""
        for pending, _ in self._reads.values():
            with contextlib.suppress(Exception):
                pending.result()
        self._reads.clear()
        self._free = list(self._buffers)
        self._next_read = self.residency.streamed.index(unit)
        self._fill_stream_buffers()

    # -- using

    @contextlib.contextmanager
    def use(self, unit: str) -> Iterator[UnitBytes]:
        """The tensors of `unit` for one step of a forward pass; units must be used in the order
        of a pass (blocks, final, embeddings as lm_head). Views of a streamed unit are valid only
        inside the `with`: its buffer is refilled with the next file as soon as it exits."""
        if unit in self._pinned:
            yield self._pinned[unit].result()
            return
        if unit not in self._reads:
            self._restart_stream_at(unit)
        pending, buffer = self._reads.pop(unit)
        try:
            yield pending.result()
        finally:
            self._free.append(buffer)
            self._fill_stream_buffers()

    def peek(self, unit: str) -> UnitBytes:
        """The tensors of `unit` for a lookup that touches few pages: the RAM copy when pinned
        (waiting for it), else the file mapping (only the pages read come off the disk)."""
        if unit in self._pinned:
            return self._pinned[unit].result()
        return self.files[unit].view()

    def wait_until_loaded(self) -> None:
        """Block until every pinned file is in RAM (start-up measurements; never needed to run)."""
        for pending in self._pinned.values():
            pending.result()

    def embeddings(self) -> EmbeddingWeights:
        return embedding_weights(self.peek(EMBEDDINGS_UNIT))

    def block(self, index: int) -> BlockWeights:
        return block_weights(self.peek(block_unit(index)), index)

    def final(self) -> LayerNormWeights:
        return final_weights(self.peek(FINAL_UNIT))

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        for file in self.files.values():
            file.close()


def open_checkpoint(directory: str | os.PathLike, *, verify: str = "fast", ram_budget: str | int | None = None,
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Verify `directory` (`"fast"`: sizes and headers; `"full"`: every hash), plan residency
    under `ram_budget` (see `parse_size`; None: `default_ram_budget` for compute `dtype`) and
    start reading the pinned files in the background."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    _raise_for_problems(directory, verify)
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    geometry = Geometry.from_config(config, config_path)
    if config.get("apply_residual_connection_post_layernorm", False):
        raise SourceError(config_path, "apply_residual_connection_post_layernorm is true",
                          "The runtime runs BLOOM as released (false); use transformers for this variant.")
    units = [EMBEDDINGS_UNIT, *(block_unit(i) for i in range(geometry.n_layer)), FINAL_UNIT]
    files = {unit: MappedFile(directory / manifest.unit_file(unit), _quant_tags(directory, manifest, unit))
             for unit in units}
    budget = default_ram_budget(geometry, dtype) if ram_budget is None else parse_size(ram_budget)
    widen = dtype == torch.float32 and not kernels.available()  # the kernel reads 16-bit weights faster
    widened = {unit: f.widened_size for unit, f in files.items()} if widen else None
    residency = plan_residency({unit: f.size for unit, f in files.items()}, geometry.n_layer, budget, widened)
    return Checkpoint(directory, manifest, config, geometry, files, _tokenizer(directory), residency)


def _quant_tags(directory: Path, manifest: Manifest, unit: str) -> dict[str, QuantType]:
    """The storage type the manifest records for each tensor of the file holding `unit`."""
    try:
        entry = manifest.file(manifest.unit_file(unit))
    except KeyError:
        raise ManifestError(directory / MANIFEST_NAME, f"lists no {manifest.unit_file(unit)} (format version "
                            f"{manifest.format_version})", "Copy manifest.json again from the source of this "
                            "directory.") from None
    return {tensor.name: tensor.quant for tensor in entry.tensors}


def _raise_for_problems(directory: Path, mode: str) -> None:
    from bloomconv.verification import verify
    report = verify(directory, fast=mode == "fast")
    # A file the manifest does not list (a README, notes) cannot change what the model computes.
    problems = [str(p) for p in report.problems if p.kind != "extra"]
    if problems:
        raise VerificationError(directory, problems)


def _tokenizer(directory: Path):
    path = directory / TOKENIZER_NAMES[0]
    if not path.exists():
        return None  # forward() on token ids still works; text in or out needs one
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))
