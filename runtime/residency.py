"""Residency planning: which files stay in RAM and which are streamed, under a RAM budget.

    pinned    read once into anonymous memory at start-up, kept for the process's life: a token
              never rereads them;
    streamed  read again every forward pass, a piece at a time (a row range of one matrix, at
              most about STREAM_PIECE_BYTES, see `readahead`), into a few reusable buffers, so a
              model larger than RAM costs (model − pinned) bytes of disk per token and the memory
              it takes does not depend on the size of any file.

The budget covers the pinned files, the stream buffers, the KV cache and the working set the run
is planned for (`memory`). What is left after the reserve and the stream buffers pins the ln_f and
embedding files first (used every token, the embeddings twice), then as many blocks as fit,
chosen evenly spaced, so that while a streamed block is read the pinned blocks before it compute;
what is still left, less than a block, pins pieces of the streamed files (read once at start-up
like a pinned file), evenly spaced in the cycle for the same reason: every byte of the budget is a
byte a token does not read from disk.
16-bit weights stay 16-bit in RAM: the dense kernel multiplies them in fp32 at the speed it reads
them. Only where it was not built, and the whole model fits even in float32 and computes in
float32, are they widened once at load for torch's fp32 GEMM.

>>> plan = plan_residency(sizes, n_layer=24, budget=2 * 10**9, pieces=pieces, reserve=3 * 10**8)  # doctest: +SKIP
>>> plan.streamed                                                               # doctest: +SKIP
('block_000', 'block_002', …)
"""
from __future__ import annotations

import dataclasses

from bloomconv.format import EMBEDDINGS_UNIT, FINAL_UNIT, block_unit

__all__ = ["Residency", "UnitPieces", "minimum_budget", "plan_residency"]


@dataclasses.dataclass(frozen=True)
class UnitPieces:
    """How one file streams: the buffer bytes each of its pieces needs, in use order."""

    sizes: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)


@dataclasses.dataclass(frozen=True)
class Residency:
    """Which files stay in RAM and which are read every forward pass, and what the plan set aside
    under `budget` bytes: `planned_bytes` (≤ budget unless the budget is below the minimum)."""

    budget: int
    pinned: tuple[str, ...]        # units, in load order
    streamed: tuple[str, ...]      # units, in use order
    pinned_bytes: int              # in RAM, after widening
    buffer_bytes: int = 0          # each stream buffer (0 when nothing streams)
    stream_buffers: int = 0        # how many
    kv_cache_bytes: int = 0        # reserved for `max_tokens`
    working_set_bytes: int = 0     # one forward pass over `max_tokens` tokens (`memory.working_set_bytes`)
    max_tokens: int = 0            # tokens (prompt + new, over the batch) the reserve is for
    streamed_pieces: int = 0       # pieces read per forward pass
    pinned_pieces: tuple[int, ...] = ()  # places in the streamed files' cycle of the pieces kept in RAM
    pinned_piece_bytes: int = 0    # their bytes
    widened: bool = False          # pinned 16-bit float tensors are held as float32
    budget_rule: str = "given"     # where the budget came from

    @property
    def pinned_count(self) -> str:
        """"N files", and "and M pieces" of streamed files when some are pinned."""
        return f"{len(self.pinned)} files" + (f" and {len(self.pinned_pieces)} pieces" if self.pinned_pieces else "")

    @property
    def stream_bytes(self) -> int:
        return self.stream_buffers * self.buffer_bytes

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held in RAM: pinned files and pieces plus the stream buffers."""
        return self.pinned_bytes + self.pinned_piece_bytes + self.stream_bytes

    @property
    def reserve_bytes(self) -> int:
        return self.kv_cache_bytes + self.working_set_bytes

    @property
    def planned_bytes(self) -> int:
        return self.resident_bytes + self.reserve_bytes

    def describe(self) -> str:
        """How the plan was computed, one line per part (`bloomconv generate --stats`)."""
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        return "\n".join([
            f"budget {mb(self.budget)} ({self.budget_rule}); planned {mb(self.planned_bytes)}",
            f"  pinned {len(self.pinned)} files, {mb(self.pinned_bytes)}"
            + (" (16-bit weights widened to float32)" if self.widened else ""),
            f"  streamed {len(self.streamed)} files in {self.streamed_pieces} pieces per pass through "
            f"{self.stream_buffers} buffers of {mb(self.buffer_bytes)} = {mb(self.stream_bytes)}"
            + (f"; {len(self.pinned_pieces)} more pieces of them pinned, {mb(self.pinned_piece_bytes)}"
               if self.pinned_pieces else ""),
            f"  KV cache {mb(self.kv_cache_bytes)} and working set {mb(self.working_set_bytes)} for "
            f"{self.max_tokens} tokens",
        ])


def minimum_budget(sizes: dict[str, int], pieces: dict[str, UnitPieces], reserve: int, stream_buffers: int) -> int:
    """The smallest budget a run fits in: its reserve plus every file streamed (or every file
    pinned, where that takes less)."""
    streaming = min(stream_buffers, sum(p.count for p in pieces.values())) * max(p.largest for p in pieces.values())
    return reserve + min(sum(sizes.values()), streaming)


def plan_residency(sizes: dict[str, int], n_layer: int, budget: int, *, pieces: dict[str, UnitPieces],
                   reserve: int = 0, stream_buffers: int = 3, widened_sizes: dict[str, int] | None = None,
                   **details) -> Residency:
    """Pin what fits in `budget` less `reserve` (final, embeddings, then evenly spaced blocks, then
    evenly spaced pieces of the streamed files); stream the rest through `stream_buffers` buffers
    of the largest streamed piece.

    When the whole model fits even with its 16-bit weights widened to float32 (`widened_sizes`,
    given for float32 compute without the dense kernel), it is pinned widened: torch's fp32 matmuls
    are faster than its bf16 ones or converting on the fly. Otherwise files are pinned as stored,
    so that the budget saves the most disk reads. A budget below `minimum_budget` streams every
    file and still takes that much. `details` (kv_cache_bytes, working_set_bytes, max_tokens,
    budget_rule) are recorded in the Residency. `sizes` may hold only some of the `n_layer` blocks,
    with or without the final and embedding files: a pipeline stage's share (`pipeline`).
    """
    blocks = [block_unit(i) for i in range(n_layer) if block_unit(i) in sizes]
    use_order = [u for u in (*blocks, FINAL_UNIT, EMBEDDINGS_UNIT) if u in sizes]
    load_order = tuple(u for u in (EMBEDDINGS_UNIT, *blocks, FINAL_UNIT) if u in sizes)
    room = budget - reserve
    if widened_sizes is not None and sum(widened_sizes.values()) <= room:
        return Residency(budget, load_order, (), sum(widened_sizes.values()), widened=True, **details)
    if sum(sizes.values()) <= room:
        return Residency(budget, load_order, (), sum(sizes.values()), **details)
    # buffers sized for the largest piece of any file: which files stream is not known yet
    room -= min(stream_buffers, sum(p.count for p in pieces.values())) * max(p.largest for p in pieces.values())
    pinned: set[str] = set()
    for unit in (FINAL_UNIT, EMBEDDINGS_UNIT):
        if unit in sizes and sizes[unit] <= room:
            pinned.add(unit)
            room -= sizes[unit]
    block_size = max(sizes[b] for b in blocks) if blocks else 1
    n_streamed = len(blocks) - min(len(blocks), max(0, room // block_size))
    streamed_blocks = {blocks[j * len(blocks) // n_streamed] for j in range(n_streamed)}  # evenly spaced
    pinned.update(b for b in blocks if b not in streamed_blocks)
    streamed = tuple(u for u in use_order if u not in pinned)
    room -= sum(sizes[b] for b in blocks if b in pinned)
    cycle = [size for u in streamed for size in pieces[u].sizes]
    kept = _pinned_pieces(cycle, room)
    count = len(cycle) - len(kept)
    return Residency(budget, tuple(u for u in load_order if u in pinned), streamed, sum(sizes[u] for u in pinned),
                     buffer_bytes=max((size for i, size in enumerate(cycle) if i not in kept), default=0),
                     stream_buffers=min(stream_buffers, count), streamed_pieces=count, pinned_pieces=kept,
                     pinned_piece_bytes=sum(cycle[i] for i in kept), **details)


def _pinned_pieces(cycle: list[int], room: int) -> tuple[int, ...]:
    """Places in `cycle` (bytes of each piece) of evenly spaced pieces that fit in `room`, their
    number found by bisection (with pieces of unequal size, a few more might have fit); at least
    one piece always streams."""
    def spaced(n: int) -> tuple[int, ...]:
        return tuple(sorted({j * len(cycle) // n for j in range(n)})) if n else ()
    fits, too_many = 0, min(len(cycle) - 1, room // max(min(cycle, default=1), 1)) + 1
    while fits + 1 < too_many:
        n = (fits + too_many) // 2
        fits, too_many = (n, too_many) if sum(cycle[i] for i in spaced(n)) <= room else (fits, n)
    return spaced(fits)
