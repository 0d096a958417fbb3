"""Open a bloomconv directory for running: check it, plan what stays in RAM, read weights ahead.

Start-up reads the manifest and the safetensors headers (and the 4-bit state blobs), plans
residency (`residency`) within the RAM budget (`memory`), starts reading, reads the tokenizer
meanwhile, then returns; weight bytes are read by one background thread: first the pinned files,
whole, and the pinned pieces of streamed files, with large reads around the page cache, each
queued right behind the one before (`files.read_one_after_another`; their buffers faulted in
alongside by a thread of their own, `FaultingIn`), then the streamed
files' pieces, in the order the forward pass uses them (`readahead`). A budget, or a machine, too
small for the run raises MemoryBudgetError naming the minimum before any weight is read.

Tensors are views of those buffers: no copy per access. A view of a piece that streams is valid
only while the forward pass multiplies by it.

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
import dataclasses
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch

from bloomconv import kernels
from bloomconv.errors import ManifestError, MemoryBudgetError, SourceError
from bloomconv.format import (CONFIG_NAME, EMBEDDINGS_UNIT, FINAL_UNIT, MANIFEST_NAME, PREFIX, QuantType,
                              TOKENIZER_NAMES, all_units, block_unit)
from bloomconv.geometry import Geometry
from bloomconv.manifest import Manifest, read_manifest
from bloomconv.process_stats import available_memory

from . import readahead
from .files import AnonymousBuffer, FaultingIn, MappedFile, read_one_after_another
from .memory import (DEFAULT_BUDGET_SHARE, DEFAULT_MAX_TOKENS, RUNTIME_OVERHEAD_BYTES, default_ram_budget,
                     kv_cache_bytes, parse_size, working_set_bytes)
from .readahead import Piece, ReadAhead, StreamedUnit, plan_pieces
from .records import (BLOCK_LINEARS, EMBEDDING_LINEARS, BlockWeights, EmbeddingWeights, LayerNormWeights, UnitBytes,
                      block_weights, embedding_weights, final_weights)
from .residency import Residency, UnitPieces, minimum_budget, plan_residency

__all__ = ["Checkpoint", "MINIMUM_BUDGET", "VERIFY_MODES", "open_checkpoint"]

VERIFY_MODES = ("fast", "full")
MINIMUM_BUDGET = "min"  # ram_budget="min": the least the run fits in (every file streamed)


class Checkpoint:
    """A verified bloomconv directory with its weights being read. Build with `open_checkpoint`.

    `use(unit)` gives a file's tensors for one forward-pass step; `embeddings()`, `block(i)` and
    `final()` give typed weights for inspection (pinned: the RAM copy; streamed: the mapping).
    """

    def __init__(self, directory: Path, manifest: Manifest, config: dict, geometry: Geometry,
                 files: dict[str, MappedFile], residency: Residency, pieces: dict[str, list[Piece]]):
        self.directory, self.manifest, self.config, self.geometry = directory, manifest, config, geometry
        self.files, self.residency = files, residency
        self.tokenizer = None  # `open_checkpoint` reads it while the pinned files are read
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bloomconv-read")
        self.pinned_read_seconds: float | None = None  # first pinned read to last, once all are done
        self._first_read_started: float | None = None  # set by the one reader thread (`_reading_starts`)
        self._last_read_ended: float | None = None
        every_piece = [piece for unit in residency.streamed for piece in pieces[unit]]
        # every pinned buffer up front, faulted in, in read order, by a thread of its own
        buffers = {} if residency.widened else {unit: AnonymousBuffer(files[unit].padded_size)
                                                for unit in residency.pinned}
        piece_buffers = {index: AnonymousBuffer(every_piece[index].nbytes) for index in residency.pinned_pieces}
        self._faulting_in = FaultingIn([*buffers.values(), *piece_buffers.values()])
        self._stopping = threading.Event()
        if residency.widened:  # each pinned file widened on the way in, through the page cache
            self._pinned: dict[str, concurrent.futures.Future] = {
                unit: self._reader.submit(self._read_widened, unit) for unit in residency.pinned}
            reads = []
        else:  # each pinned file and piece read as it is, one read queued right behind the other
            self._pinned = {unit: concurrent.futures.Future() for unit in residency.pinned}
            reads = [_PinnedRead(self._pinned[unit], files[unit], buffer, files[unit].whole,
                                 functools.partial(files[unit].tensors_in, buffer)) for unit, buffer in buffers.items()]
        kept = {index: concurrent.futures.Future() for index in piece_buffers}
        for index, buffer in piece_buffers.items():
            piece, file = every_piece[index], files[every_piece[index].unit]
            reads.append(_PinnedRead(kept[index], file, buffer, piece.spans,
                                     functools.partial(piece.placed, file, buffer.tensor)))
        if reads:
            self._reader.submit(self._read_pinned, reads)
        self._pending_reads = [*self._pinned.values(), *kept.values()]
        cycle = [piece for index, piece in enumerate(every_piece) if index not in kept]
        self._stream = ReadAhead(self._reader, files, cycle, residency.buffer_bytes, residency.stream_buffers)
        parts: dict[str, dict[str, list]] = {unit: {} for unit in residency.streamed}
        place = 0  # in the read-ahead's cycle
        for index, piece in enumerate(every_piece):  # unit -> matrix -> its pieces' rows and takers
            if index in kept:
                take = functools.partial(_pinned_piece, kept[index])
            else:
                take, place = functools.partial(self._stream.take, place), place + 1
            parts[piece.unit].setdefault(piece.module, []).append((piece.rows, take))
        self._streamed = {unit: StreamedUnit(files[unit], {m: tuple(p) for m, p in modules.items()})
                          for unit, modules in parts.items()}

    def _reading_starts(self) -> None:
        """Note when the first start-up read began (the reader is one thread: the start-up times are
        written by it alone, the last end before the future its waiters then read)."""
        if self._first_read_started is None:
            self._first_read_started = time.perf_counter()

    def _read_widened(self, unit: str) -> UnitBytes:
        self._reading_starts()
        source, _ = self.files[unit].widened()
        self._last_read_ended = time.perf_counter()
        return source

    def _read_pinned(self, reads: list["_PinnedRead"]) -> None:
        """Read each in order, one queued behind the other (`read_one_after_another`); each future
        gets its tensors once its bytes are in, or the error that stopped the reading (this one's
        and all later ones); those not read when closing are cancelled."""
        done = 0
        self._reading_starts()
        try:
            with contextlib.closing(read_one_after_another([(r.file, r.buffer.memoryview(), r.spans) for r in reads],
                                                           self._stopping)) as reading:
                for index in reading:
                    self._last_read_ended = time.perf_counter()  # before the future: its waiters read this
                    reads[index].future.set_result(reads[index].tensors())
                    done = index + 1
        except BaseException as exc:
            for read in reads[done:]:
                read.future.set_exception(exc)
            raise
        for read in reads[done:]:  # stopped: closing
            read.future.cancel()

    @contextlib.contextmanager
    def use(self, unit: str) -> Iterator[UnitBytes]:
        """The tensors of `unit` for one step of a forward pass; a streamed unit's matrices are read
        piece by piece as they are multiplied, in the order of a pass (blocks, final, embeddings as
        lm_head)."""
        yield self._pinned[unit].result() if unit in self._pinned else self._streamed[unit]

    def peek(self, unit: str) -> UnitBytes:
        """The tensors of `unit` for a lookup that touches few pages: the RAM copy when pinned
        (waiting for it), else the file mapping (only the pages read come off the disk)."""
        if unit in self._pinned:
            return self._pinned[unit].result()
        return self.files[unit].view()

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The streamed files' pieces, in the order every forward pass reads them."""
        return self._stream.pieces

    def wait_until_loaded(self) -> None:
        """Block until every pinned file and piece is in RAM (start-up measurements; never needed to
        run); then `pinned_read_seconds` is how long reading them took."""
        for pending in self._pending_reads:
            pending.result()
        if self._pending_reads:
            self.pinned_read_seconds = self._last_read_ended - self._first_read_started

    def embeddings(self) -> EmbeddingWeights:
        return embedding_weights(self.peek(EMBEDDINGS_UNIT))

    def block(self, index: int) -> BlockWeights:
        return block_weights(self.peek(block_unit(index)), index)

    def final(self) -> LayerNormWeights:
        return final_weights(self.peek(FINAL_UNIT))

    def check_room(self, tokens: int, dtype: torch.dtype) -> None:
        """Raise MemoryBudgetError when a run over `tokens` tokens (prompt + new, over the batch)
        needs more than the plan reserved and than the memory left can give."""
        residency = self.residency
        if tokens <= residency.max_tokens:
            return
        extra = (kv_cache_bytes(self.geometry, dtype, tokens) + working_set_bytes(self.geometry, dtype, tokens)
                 - residency.reserve_bytes)
        room = int(DEFAULT_BUDGET_SHARE * available_memory())
        if extra > room:
            raise MemoryBudgetError(
                self.directory, extra, room,
                f"{tokens} tokens (prompt and new, over the batch) need {extra / 1e6:,.0f} MB more KV cache and "
                f"working set than the {residency.max_tokens} tokens planned for, and {room / 1e6:,.0f} MB is free",
                f"Generate fewer tokens, or load with max_tokens={tokens} (it then plans for them within the budget).")

    def close(self) -> None:
        self._stopping.set()
        self._faulting_in.stop()
        self._reader.shutdown(wait=True, cancel_futures=True)
        for pending in self._pending_reads:  # a read never started (cancelled above) leaves its future unset
            pending.cancel()
        for file in self.files.values():
            file.close()


def open_checkpoint(directory: str | os.PathLike, *, verify: str = "fast", ram_budget: str | int | None = None,
                    dtype: torch.dtype = torch.float32, max_tokens: int | None = None,
                    units: Collection[str] | None = None, **trusted_signer) -> Checkpoint:
    """Verify `directory` (`"fast"`: sizes and headers; `"full"`: every hash; and its signature
    when `trusted_signer` names one: `public_key`, `certificate_chain`, or `identity` and `issuer`,
    as `bloomconv.verify` takes them), plan residency within `ram_budget` (see `parse_size`; "min":
    the least that runs; None: `default_ram_budget`) for runs of up to `max_tokens` tokens in
    compute `dtype`, and start reading the pinned files in the background.

    `units`: open only these (a pipeline rank's share, `pipeline`): only their files are verified,
    planned for and opened; the others may be absent. The tokenizer is read only with the
    embeddings, which turn text into the first hidden states. None: every unit."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    holds_text = units is None or EMBEDDINGS_UNIT in units
    only = None if units is None else {CONFIG_NAME, *(manifest.unit_file(unit) for unit in units),
                                       *(TOKENIZER_NAMES if holds_text else ())}
    _raise_for_problems(directory, verify, trusted_signer, only)
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    geometry = Geometry.from_config(config, config_path)
    if config.get("apply_residual_connection_post_layernorm", False):
        raise SourceError(config_path, "apply_residual_connection_post_layernorm is true",
                          "The runtime runs BLOOM as released (false); use transformers for this variant.")
    every_unit = all_units(geometry.n_layer)
    units = every_unit if units is None else [unit for unit in every_unit if unit in units]
    held = dataclasses.replace(geometry, n_layer=sum(unit not in (EMBEDDINGS_UNIT, FINAL_UNIT) for unit in units))
    files = {unit: MappedFile(directory / manifest.unit_file(unit), _quant_tags(directory, manifest, unit))
             for unit in units}
    matrices = _matrices(geometry.n_layer)
    pieces = {unit: plan_pieces(files[unit], unit, matrices[unit], readahead.STREAM_PIECE_BYTES) for unit in units}
    unit_pieces = {unit: UnitPieces(tuple(piece.nbytes for piece in p)) for unit, p in pieces.items()}
    sizes = {unit: f.resident_size for unit, f in files.items()}
    kv, working_set = kv_cache_bytes(held, dtype, max_tokens), working_set_bytes(held, dtype, max_tokens)
    minimum = minimum_budget(sizes, unit_pieces, kv + working_set, readahead.STREAM_BUFFERS)
    parts = (f"weights {(minimum - kv - working_set) / 1e6:,.1f} MB, KV cache {kv / 1e6:,.1f} MB and "
             f"working set {working_set / 1e6:,.1f} MB for {max_tokens} tokens")
    if isinstance(ram_budget, str) and ram_budget.strip().lower() == MINIMUM_BUDGET:
        budget, rule = minimum, "the minimum"
    elif ram_budget is None:
        available = available_memory()
        budget = default_ram_budget(available)
        rule = (f"{DEFAULT_BUDGET_SHARE:.0%} of {available / 1e6:,.0f} MB available less "
                f"{RUNTIME_OVERHEAD_BYTES / 1e6:,.0f} MB for the runtime")
        if budget < minimum:
            raise MemoryBudgetError(directory, minimum, budget,
                                    f"this machine leaves {max(budget, 0) / 1e6:,.0f} MB for the run ({rule}), "
                                    f"below the {minimum / 1e6:,.0f} MB it needs at least ({parts})",
                                    "Free memory, or plan for fewer tokens (--max-new-tokens; max_tokens=).")
    else:
        budget, rule = parse_size(ram_budget), "given"
        if budget < minimum:
            raise MemoryBudgetError(directory, minimum, budget,
                                    f"the RAM budget of {budget / 1e6:,.1f} MB is below the {minimum / 1e6:,.1f} MB "
                                    f"this run needs at least ({parts})",
                                    f"Give at least {-(-minimum // 10**6)}MB (--ram-budget; ram_budget=), or "
                                    f"\"{MINIMUM_BUDGET}\" for the minimum.")
    widen = dtype == torch.float32 and not kernels.available()  # the kernel reads 16-bit weights faster
    widened = {unit: f.widened_size for unit, f in files.items()} if widen else None
    residency = plan_residency(sizes, geometry.n_layer, budget, pieces=unit_pieces, reserve=kv + working_set,
                               stream_buffers=readahead.STREAM_BUFFERS, widened_sizes=widened, kv_cache_bytes=kv,
                               working_set_bytes=working_set, max_tokens=max_tokens, budget_rule=rule)
    checkpoint = Checkpoint(directory, manifest, config, geometry, files, residency, pieces)
    try:  # while the pinned files are being read
        checkpoint.tokenizer = _tokenizer(directory) if holds_text else None
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


@dataclasses.dataclass(frozen=True)
class _PinnedRead:
    """A pinned file or piece to read at start-up: `spans` of `file` into `buffer`, then `future`
    gets `tensors()`, the weights over the buffer."""
    future: concurrent.futures.Future
    file: MappedFile
    buffer: AnonymousBuffer
    spans: tuple
    tensors: Callable[[], object]


@contextlib.contextmanager
def _pinned_piece(read: concurrent.futures.Future) -> Iterator:
    """A pinned piece's weight (`Taker`), waiting for its start-up read."""
    yield read.result()


def _matrices(n_layer: int) -> dict[str, list[str]]:
    """The matrices of each unit's file, in the order a forward pass multiplies by them."""
    return {EMBEDDINGS_UNIT: [f"{PREFIX}{name}" for name in EMBEDDING_LINEARS], FINAL_UNIT: [],
            **{block_unit(i): [f"{PREFIX}h.{i}.{name}" for name in BLOCK_LINEARS] for i in range(n_layer)}}


def _quant_tags(directory: Path, manifest: Manifest, unit: str) -> dict[str, QuantType]:
    """The storage type the manifest records for each tensor of the file holding `unit`."""
    try:
        entry = manifest.file(manifest.unit_file(unit))
    except KeyError:
        raise ManifestError(directory / MANIFEST_NAME, f"lists no {manifest.unit_file(unit)} (format version "
                            f"{manifest.format_version})", "Copy manifest.json again from the source of this "
                            "directory.") from None
    return {tensor.name: tensor.quant for tensor in entry.tensors}


def _raise_for_problems(directory: Path, mode: str, trusted_signer: dict, only: set[str] | None) -> None:
    from bloomconv.verification import verify
    report = verify(directory, fast=mode == "fast", only=only, **trusted_signer)
    # A file the manifest does not list (a README, notes) cannot change what the model computes;
    # one added since signing is refused all the same (the signer did not vouch for it).
    report.raise_for_problems(ignore_kinds=("extra",))


def _tokenizer(directory: Path):
    path = directory / TOKENIZER_NAMES[0]
    if not path.exists():
        return None  # forward() on token ids still works; text in or out needs one
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))
