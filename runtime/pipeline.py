"""One model over several processes or machines: each rank holds a contiguous range of the blocks,
and hidden states go rank to rank over torch.distributed (gloo on CPUs, NCCL on GPUs).

Launch every rank with `torchrun` (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then
`load(directory, pipeline=True)` on every rank, or `torchrun … -m bloomconv generate DIR PROMPT
--pipeline`. Rank 0 holds the tokenizer, the embeddings and ln_f (with the lm_head tied to the
embeddings) besides its blocks, and returns the text; on the other ranks `load` serves their
blocks until rank 0 closes the model, then returns None::

    model = bloomconv.load("bloom-176b-int8", pipeline=True, ram_budget="14GB")   # every rank
    if model is not None:                                                          # rank 0
        print(model.generate("The capital of France is"))
        model.close()                     # the other ranks' `load` returns

Each rank reads the manifest, and the ranks agree on a split (`plan_stages`): contiguous block
ranges whose bytes are proportional to each rank's RAM budget when every rank gives one, equal
otherwise; rank 0's share counts its embedding and final files. Each rank then verifies, plans
residency for and opens only its own files (others' may be absent from its disk); what does not fit
its budget streams from its disk as in a single process. A rank that cannot start tells the
others, and every rank raises PipelineError naming it and its problem.

A forward pass splits the batch into micro-batches (`PipelineOptions.micro_batches`; by default
one per rank when the batch is large enough to be compute-bound): rank 0 embeds one and runs its
blocks, sends it on and starts the next, so that the ranks work at once; the last rank sends the
hidden states back to rank 0 for ln_f and the lm_head. Every rank keeps the KV cache of its
blocks per micro-batch. The micro-batches of one step fill and drain the pipeline: with M of
them over N ranks a step takes M + N − 1 stage times of one micro-batch. Batch 1 is one
micro-batch: a step takes the sum of the stages and the hops.

Why plain isend/irecv and not torch.distributed.pipelining: its schedules run fixed-shape
micro-batches through stateless stage modules (training's forward and backward). Decoding needs
a KV cache kept on every stage across steps and a shape that changes from the prefill to each
step; and its stages exchange shapes with `send_object_list`, which unpickles what it receives.
Here a fixed-size int64 header and one tensor of bytes are all that cross the wire per message.

Wire, from rank r to rank r+1 (the last to rank 0): a header of HEADER_FIELDS int64, then for a
pass one message holding the attention mask (B, cached + T) int64 (not to rank 0, which has it)
and the hidden states (B, T, H) in the compute dtype. A rank checks each header against the
model's geometry and its own caches before allocating anything, and receives into tensors of the
shape and dtype it expects: a peer cannot make it unpickle, run or allocate beyond its memory
check. The transport has no authentication or encryption: run it on a trusted network only.

Failure: every wait for a neighbour has a deadline (`timeout`; `idle_timeout` for a serving
rank between passes). A rank that sees its neighbour's connection close (the process died, or
its machine) raises PipelineError naming that rank, after passing an abort naming it on round
the ring, so that every other rank stops at once with the same name. A rank whose deadline
passes names the neighbour it waited for; gloo then closes that rank's connections, so the
others stop at once too, naming it as lost (its own output says why).
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import itertools
import math
import os
import socket
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from bloomconv.errors import BloomconvError, OptionsError, PipelineError
from bloomconv.format import CONFIG_NAME, EMBEDDINGS_UNIT, FINAL_UNIT, MANIFEST_NAME, block_unit
from bloomconv.geometry import Geometry
from bloomconv.kernels import fourbit
from bloomconv.manifest import Manifest, read_manifest

from .checkpoint import Checkpoint, open_checkpoint
from .generate import Bloom
from .memory import parse_size
from .model import KVCache, Transformer, default_prefill_dtype

__all__ = ["PipelineBloom", "PipelineCache", "PipelineOptions", "Stage", "load_pipeline", "plan_stages"]

MAGIC = 0x626C6F6F6D706970  # "bloompip": a header from something else is refused
HEADER_FIELDS = 10          # magic, kind, cache_id, slot, B, T, cached, capacity, last_only, lost_rank
WORK, STOP, ABORT = 1, 2, 3
MAX_SLOTS = 4096            # micro-batches of one cache
TEXT_BYTES = 4096           # a start-up error or host name, as UTF-8 in a uint8 tensor
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
ABORT_SECONDS = 5.0         # how long passing an abort on may take
MICRO_BATCH_ROWS = fourbit.SMALL_BATCH_ROWS  # where multiplying, not reading the weights, is the cost


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How `load(..., pipeline=PipelineOptions(...))` runs; `pipeline=True` takes the defaults.

    `timeout`: seconds a rank waits for a message from its neighbour during a pass; it must exceed
    the time of a pass through the other stages. `idle_timeout`: seconds a serving rank waits for
    the next pass (None: as long as rank 0's connection stays open; `bloomconv generate
    --pipeline` sets it to `timeout`, rank 0 sending without pause). `micro_batches`: how many
    parts a batch is split into. None: one per rank as long as each part keeps at least
    MICRO_BATCH_ROWS sequences, else fewer: below that a stage's time is reading its weights,
    which every part reads again, so splitting slows decoding. `start_timeout`: seconds for the
    rendezvous and each rank's start-up (verification, planning).
    """

    timeout: float = 120.0
    idle_timeout: float | None = None
    micro_batches: int | None = None
    start_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not self.timeout > 0 or (self.idle_timeout is not None and not self.idle_timeout > 0):
            raise OptionsError(f"pipeline timeouts must be positive, not {self.timeout} and {self.idle_timeout}.")
        if self.micro_batches is not None and not 1 <= self.micro_batches <= MAX_SLOTS:
            raise OptionsError(f"micro_batches {self.micro_batches} is outside 1..{MAX_SLOTS}.")


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one rank holds: the blocks `layers` (a contiguous range), and on rank 0 the embedding
    and final files too; `nbytes` is their size on disk."""

    rank: int
    layers: range
    nbytes: int

    @property
    def units(self) -> list[str]:
        blocks = [block_unit(layer) for layer in self.layers]
        return [EMBEDDINGS_UNIT, *blocks, FINAL_UNIT] if self.rank == 0 else blocks


def plan_stages(manifest: Manifest, n_layer: int, weights: Sequence[float]) -> list[Stage]:
    """Contiguous block ranges, one per rank, whose bytes (rank 0's with the embedding and final
    files) come closest to shares proportional to `weights`. Every rank but rank 0 gets at least
    one block (rank 0 may get none when its embeddings exceed its share).

    >>> [s.layers for s in plan_stages(manifest, 70, [1, 1, 1, 1])]     # doctest: +SKIP
    [range(0, 14), range(14, 33), range(33, 52), range(52, 70)]
    """
    size = lambda unit: manifest.file(manifest.unit_file(unit)).size  # noqa: E731
    ranks = len(weights)
    if ranks - 1 > n_layer:
        raise OptionsError(f"{ranks} ranks for {n_layer} blocks: every rank but rank 0 needs a block. "
                           f"Launch at most {n_layer + 1} ranks.")
    head = size(EMBEDDINGS_UNIT) + size(FINAL_UNIT)
    prefix = [head]  # bytes of rank 0's files and the blocks before each boundary
    for layer in range(n_layer):
        prefix.append(prefix[-1] + size(block_unit(layer)))
    total, weight_sum = prefix[-1], sum(weights)
    ends, start = [], 0
    for rank in range(ranks - 1):
        target = total * sum(weights[:rank + 1]) / weight_sum
        lowest, highest = start + (rank > 0), n_layer - (ranks - 1 - rank)
        end = min(range(lowest, highest + 1), key=lambda b: abs(prefix[b] - target))
        ends.append(end)
        start = end
    ends.append(n_layer)
    starts = [0, *ends[:-1]]
    # prefix[0] is rank 0's files: rank 0's share is prefix[end], another's the blocks between
    return [Stage(rank, range(a, b), prefix[b] - (prefix[a] if rank else 0))
            for rank, (a, b) in enumerate(zip(starts, ends))]


def load_pipeline(directory: str | os.PathLike, options: PipelineOptions = PipelineOptions(), *,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  ram_budget: str | int | None = None, prefill_dtype: torch.dtype | None = None,
                  **opening) -> "PipelineBloom | None":
    """Join the torchrun-launched group, open this rank's share of `directory`, and on rank 0
    return the model; on the other ranks serve until rank 0 closes it, then return None.
    `opening`: `open_checkpoint`'s verify, max_tokens and signer options (`load` documents them);
    `prefill_dtype` as `load`'s, each rank applying it to its own blocks; left to the default, every
    rank takes rank 0's (bf16 where rank 0's CPU multiplies bf16 natively), so all blocks agree.
    Raises PipelineError naming the rank and its problem when any rank cannot start."""
    device = torch.device(device)
    if "RANK" not in os.environ and not dist.is_initialized():
        raise OptionsError("pipeline=True needs a process group: launch every rank with torchrun (e.g. "
                           "`torchrun --nproc-per-node 2 -m bloomconv generate DIR PROMPT --pipeline`).")
    owns_group = not dist.is_initialized()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=options.start_timeout))
    rank, ranks = dist.get_rank(), dist.get_world_size()
    exchange = _Exchange(device if dist.get_backend() == "nccl" else torch.device("cpu"))
    hosts = exchange.texts(socket.gethostname())
    who = lambda r: f"rank {r} of {ranks} ({hosts[r]})"  # noqa: E731
    directory = Path(directory)
    try:
        # 1. the same model everywhere, and each rank's budget: the split
        try:
            manifest = read_manifest(directory)
            digest = hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).digest()
            n_layer = Geometry.from_file(directory / CONFIG_NAME).n_layer
            budget = -1 if ram_budget is None or str(ram_budget).strip().lower() == "min" else parse_size(ram_budget)
            # the products of long passes: the caller's dtype, else this rank's default (its CPU's)
            products = prefill_dtype or default_prefill_dtype(dtype, device, manifest.model["dtype"])
            facts = [budget, DTYPE_CODES[dtype], int.from_bytes(digest[:8], "big", signed=True), DTYPE_CODES[products]]
            problem = ""
        except Exception as exc:  # noqa: BLE001 - any failure is told to the others, or they wait for it
            facts, problem, n_layer, failure = [-1, -1, 0, -1], _describe(exc), 0, exc
        else:
            failure = None
        everyone = exchange.ints(facts)
        _raise_for_problems(exchange.texts(problem), who, failure)
        if len({tuple(f[1:3]) for f in everyone}) > 1:
            seen = ", ".join(f"{who(r)}: manifest.json sha256 {f[2] & (2**64 - 1):016x}…, dtype code {f[1]}"
                             for r, f in enumerate(everyone))
            raise PipelineError(f"the ranks do not run the same model ({seen}). Give every rank a copy of the "
                                "same converted directory, and the same --dtype.")
        budgets = [f[0] for f in everyone]
        # one choice for every block, rank 0's: ranks on different CPUs would otherwise mix products
        prefill_dtype = DTYPES_BY_CODE[everyone[0][3]]
        stages = plan_stages(manifest, n_layer, budgets if min(budgets) > 0 else [1] * ranks)
        stage = stages[rank]
        # 2. each rank opens its share; any failure stops every rank
        checkpoint, problem, failure = None, "", None
        try:
            checkpoint = open_checkpoint(directory, dtype=dtype, ram_budget=ram_budget, units=stage.units, **opening)
        except Exception as exc:  # noqa: BLE001 - as above
            problem, failure = _describe(exc), exc
        try:
            _raise_for_problems(exchange.texts(problem), who, failure)
        except PipelineError:
            if checkpoint is not None:
                checkpoint.close()
            raise
    except BaseException:
        if owns_group:
            dist.destroy_process_group()
        raise
    transformer = Transformer(checkpoint, dtype=dtype, device=device, prefill_dtype=prefill_dtype)
    ring = _Ring(rank, ranks, device, who, options) if ranks > 1 else None
    if rank == 0:
        driver = _Driver(transformer, stage, ring, options.micro_batches, owns_group)
        return PipelineBloom(checkpoint, driver, stages, hosts)
    try:
        _Server(transformer, stage, ring, last=rank == ranks - 1).serve()
    finally:
        checkpoint.close()
        if owns_group:
            dist.destroy_process_group()
    return None


class PipelineCache:
    """The KV cache of one batch over a pipeline: rank 0's blocks' per micro-batch here, the other
    ranks' blocks' held by them under `cache_id`. Only the newest cache can be continued."""

    def __init__(self, cache_id: int, rows: list[slice], n_layer: int, capacity: int):
        self.cache_id, self.rows, self.capacity = cache_id, rows, capacity
        self.parts = [KVCache(n_layer, capacity) for _ in rows]
        self.length = 0

    @property
    def nbytes(self) -> int:
        """What rank 0 holds (each other rank holds its blocks' share)."""
        return sum(part.nbytes for part in self.parts)


class PipelineBloom(Bloom):
    """`Bloom` on rank 0 of a pipeline: the same generate/stream/forward; `stages` says which rank
    holds which blocks. `close()` releases the other ranks (their `load` returns)."""

    def __init__(self, checkpoint: Checkpoint, driver: "_Driver", stages: list[Stage], hosts: list[str]):
        super().__init__(checkpoint, driver)
        self.stages, self.hosts = stages, hosts

    def __repr__(self) -> str:
        shares = ", ".join(f"rank {s.rank} ({self.hosts[s.rank]}) "
                           + (f"blocks {s.layers.start}-{s.layers.stop - 1}" if s.layers else "no blocks")
                           + f" {s.nbytes / 1e6:,.1f} MB" for s in self.stages)
        return f"{super().__repr__()[:-1]}; pipeline: {shares})"

    def close(self) -> None:
        try:
            self.transformer.stop()
        finally:
            super().close()


class _Exchange:
    """Start-up facts from every rank, as tensors (an all_gather; nothing pickled)."""

    def __init__(self, device: torch.device):
        self.device = device

    def ints(self, values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return [t.tolist() for t in everyone]

    def texts(self, text: str) -> list[str]:
        data = bytearray(TEXT_BYTES)
        encoded = text.encode("utf-8")[:TEXT_BYTES]
        data[:len(encoded)] = encoded
        mine = torch.frombuffer(data, dtype=torch.uint8).to(self.device, copy=True)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return [_printable(bytes(t.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace")) for t in everyone]


def _printable(text: str) -> str:
    """A peer's text without control characters (it goes to a terminal)."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _raise_for_problems(problems: list[str], who, failure: BaseException | None) -> None:
    """PipelineError listing every rank that could not start (`failure`: this rank's own error)."""
    failed = [(rank, problem) for rank, problem in enumerate(problems) if problem]
    if failed:
        lines = "\n".join(f"  {who(rank)}: {problem}" for rank, problem in failed)
        raise PipelineError(f"{len(failed)} rank(s) could not start, so none runs:\n{lines}\n"
                            "Fix what each names (for damaged files: copy them again to that machine).") from failure


@dataclasses.dataclass(frozen=True)
class _Header:
    kind: int
    cache_id: int = 0
    slot: int = 0
    B: int = 0
    T: int = 0
    cached: int = 0
    capacity: int = 0
    last_only: int = 0
    lost_rank: int = -1

    def tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([MAGIC, *dataclasses.astuple(self)], dtype=torch.int64, device=device)


class _Ring:
    """Messages to the next rank and from the previous one (the last rank's next is rank 0), each
    wait with its deadline, failures turned into PipelineError naming the rank."""

    def __init__(self, rank: int, ranks: int, device: torch.device, who, options: PipelineOptions):
        self.rank, self.ranks, self.device, self.who, self.options = rank, ranks, device, who, options
        self.next, self.previous = (rank + 1) % ranks, (rank - 1) % ranks
        self.broken = False  # a neighbour was lost or refused: nothing more is sent
        self._sending: list[tuple[dist.Work, tuple[torch.Tensor, ...]]] = []

    def send(self, header: _Header, *payload: torch.Tensor) -> None:
        """The header, then the payload's tensors as the bytes of one message (each message costs a
        wake-up of both sides: fewer is faster)."""
        body = [torch.cat([t.contiguous().view(torch.uint8).flatten() for t in payload])] if payload else []
        tensors = (header.tensor(self.device), *body)
        try:
            works = [dist.isend(t, self.next) for t in tensors]
        except RuntimeError as exc:
            raise self._failed(self.next, exc, self.options.timeout, sending=True) from None
        self._sending.extend((work, tensors) for work in works)

    def flush(self) -> None:
        """Wait until every message sent has left."""
        sending, self._sending = self._sending, []
        for work, _ in sending:
            self._wait(work, self.next, self.options.timeout, sending=True)

    def receive_header(self, timeout: float | None) -> _Header:
        raw = self._receive(torch.empty(HEADER_FIELDS, dtype=torch.int64, device=self.device), timeout).tolist()
        if raw[0] != MAGIC or raw[1] not in (WORK, STOP, ABORT):
            raise self.refuse(f"a header that is not bloomconv's pipeline's ({raw[:2]})")
        header = _Header(*raw[1:])
        if header.kind == ABORT:
            lost = header.lost_rank
            if self.next != lost and 0 <= lost < self.ranks:
                self.abort(lost)
            self.broken = True
            raise PipelineError(f"{self.who(lost) if 0 <= lost < self.ranks else 'a rank'} was lost (reported by "
                                f"{self.who(self.previous)}); stopping. See that rank's own output for the cause.")
        return header

    def receive(self, *expected: tuple[tuple[int, ...], torch.dtype]) -> list[torch.Tensor]:
        """The tensors of one message, of the shapes and dtypes `expected` (a message of another
        size fails the receive): views of the bytes received."""
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in expected]
        body = self._receive(torch.empty(sum(sizes), dtype=torch.uint8, device=self.device), self.options.timeout)
        offsets = [0, *itertools.accumulate(sizes)]  # int64 first, so every view is aligned
        return [body[a:b].view(dtype).view(shape) for (shape, dtype), a, b in zip(expected, offsets, offsets[1:])]

    def check(self, header: _Header) -> None:
        """Refuse a pass the geometry or this rank's state does not allow, before allocating for it."""
        if header.kind != WORK:
            return
        if not (1 <= header.B and 1 <= header.T and 0 <= header.cached
                and header.cached + header.T <= header.capacity and 0 <= header.slot < MAX_SLOTS
                and header.last_only in (0, 1)):
            raise self.refuse(f"a pass the model cannot run ({header})")

    def abort(self, lost: int) -> None:
        """Tell the next rank that `lost` is gone (best effort: it may be gone too)."""
        if self.next == lost:
            return
        try:
            work = dist.isend(_Header(ABORT, lost_rank=lost).tensor(self.device), self.next)
            work.wait(timeout=datetime.timedelta(seconds=ABORT_SECONDS))
        except RuntimeError:
            pass

    def _receive(self, into: torch.Tensor, timeout: float | None) -> torch.Tensor:
        try:
            work = dist.irecv(into, self.previous)
        except RuntimeError as exc:
            raise self._failed(self.previous, exc, timeout) from None
        self._wait(work, self.previous, timeout)
        return into

    def _wait(self, work: dist.Work, peer: int, timeout: float | None, sending: bool = False) -> None:
        limit = datetime.timedelta(seconds=timeout) if timeout is not None else datetime.timedelta(days=365)
        try:
            work.wait(timeout=limit)
        except RuntimeError as exc:
            raise self._failed(peer, exc, timeout, sending) from None

    def _failed(self, peer: int, error: RuntimeError, timeout: float | None, sending: bool = False) -> PipelineError:
        self.abort(peer)
        self.broken = True
        # gloo's own words, less its source location and its advice to read the other rank's log
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        first_line = first_line[first_line.find("]") + 1:].split(". This is typically")[0].strip()
        words = first_line.lower()
        if "timed out" in words or "timeout" in words:
            return PipelineError(f"{self.who(peer)} {'took' if sending else 'sent'} nothing for {timeout or 0:g} s: "
                                 "it hangs, or is slower than the timeout (raise it: --pipeline-timeout, "
                                 "PipelineOptions.timeout). Stopping.")
        if not any(sign in words for sign in ("closed", "reset", "broken pipe", "connection")):
            return PipelineError(f"an exchange with {self.who(peer)} failed (gloo: {first_line[:200]}): every rank "
                                 "must run the same bloomconv with the same options. Stopping.")
        return PipelineError(f"lost {self.who(peer)}: its connection closed (it died, its machine went down, or it "
                             f"stopped on an error of its own: its output says which; gloo: {first_line[:200]}). "
                             "Stopping.")

    def refuse(self, what: str) -> PipelineError:
        """The error for a message this rank will not take from the previous one (told to the others)."""
        self.abort(self.previous)
        self.broken = True
        return PipelineError(f"{self.who(self.previous)} sent {what}; refused. Every rank must run the same "
                             "bloomconv on the same model, on a trusted network (the transport is not authenticated).")


class _Driver:
    """Rank 0: `Transformer.forward`'s interface over the pipeline, for `Bloom`."""

    def __init__(self, transformer: Transformer, stage: Stage, ring: _Ring | None, micro_batches: int | None,
                 owns_group: bool):
        self.transformer, self.stage, self.ring = transformer, stage, ring
        self.micro_batches, self.owns_group = micro_batches, owns_group
        self.checkpoint, self.geometry = transformer.checkpoint, transformer.geometry
        self.dtype, self.device = transformer.dtype, transformer.device
        self._newest = 0
        self._stopped = False
        atexit.register(_stop_at_exit, weakref.ref(self))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | PipelineCache | None = None, *,
                last_only: bool = False) -> tuple[torch.Tensor, PipelineCache]:
        """As `Transformer.forward`: logits and the cache extended by T; `past` is a PipelineCache
        from the previous call, or None / an empty KVCache to start one."""
        if self._stopped:
            raise OptionsError("this pipeline model is closed. Load it again.")
        t = self.transformer
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        past = self._cache(past, B)
        if attention_mask is None:
            attention_mask = torch.ones(B, past.length + T, dtype=torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        if attention_mask.shape != (B, past.length + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must be "
                             f"(batch, cached + new tokens) = ({B}, {past.length + T})")
        logits = []
        for slot, (rows, part) in enumerate(zip(past.rows, past.parts)):
            mask, ids = attention_mask[rows], input_ids[rows]
            b = ids.shape[0]
            bias = t.attention_bias(mask, b, T, past.length)
            with t.threads_for(b * T):
                x = t.run(t.embed(ids), self.stage.layers, bias, part, head=False)
                if self.ring is None:
                    logits.append(t.run(x, range(0), bias, part, head=True, last_only=last_only))
            if self.ring is not None:
                header = _Header(WORK, past.cache_id, slot, b, T, past.length, max(past.capacity, past.length + T),
                                 int(last_only))
                self.ring.send(header, mask, x)
        if self.ring is not None:
            for slot, rows in enumerate(past.rows):
                b, back = rows.stop - rows.start, 1 if last_only else T
                header = self.ring.receive_header(self.ring.options.timeout)
                if (header.kind, header.cache_id, header.slot, header.B, header.T) != (WORK, past.cache_id, slot, b, T):
                    raise self.ring.refuse(f"hidden states for another pass ({header})")
                (x,) = self.ring.receive(((b, back, self.geometry.hidden_size), self.dtype))
                with t.threads_for(b * back):
                    logits.append(t.run(x, range(0), None, None, head=True, last_only=last_only))
            self.ring.flush()
        past.length += T
        return torch.cat(logits), past

    def _cache(self, past: KVCache | PipelineCache | None, B: int) -> PipelineCache:
        if isinstance(past, PipelineCache):
            if past.cache_id != self._newest:
                raise OptionsError("this KV cache was replaced by a newer one: over a pipeline only the newest "
                                   "continues. Start again from the prompt.")
            if sum(r.stop - r.start for r in past.rows) != B:
                raise ValueError(f"the cache holds {sum(r.stop - r.start for r in past.rows)} sequences, not {B}")
            return past
        if past is not None and past.length:
            raise OptionsError("a KV cache from a single-process model cannot continue over a pipeline. Start "
                               "again from the prompt.")
        self._newest += 1
        ranks = self.ring.ranks if self.ring is not None else 1
        parts = self.micro_batches or max(1, min(ranks, B // MICRO_BATCH_ROWS))
        bounds = [int(rows[0]) for rows in torch.arange(B).tensor_split(min(B, parts)) if len(rows)]
        rows = [slice(a, b) for a, b in zip(bounds, [*bounds[1:], B])]
        return PipelineCache(self._newest, rows, self.geometry.n_layer, past.capacity if past is not None else 0)

    def stop(self) -> None:
        """Send the other ranks home (their `load` returns) and leave the process group."""
        if self._stopped:
            return
        self._stopped = True
        if self.ring is not None and not self.ring.broken:
            self.ring.send(_Header(STOP))
            self.ring.flush()
            self.ring.receive_header(self.ring.options.timeout)  # it has gone round: every rank stopped
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _stop_at_exit(driver: "weakref.ref[_Driver]") -> None:
    alive = driver()
    if alive is not None:
        try:
            alive.stop()
        except BloomconvError:
            pass  # the others are gone already


class _Server:
    """Ranks 1…N-1: receive a micro-batch, run this rank's blocks with its cache, pass it on."""

    def __init__(self, transformer: Transformer, stage: Stage, ring: _Ring, last: bool):
        self.transformer, self.stage, self.ring, self.last = transformer, stage, ring, last
        self.geometry = transformer.geometry
        self._cache_id, self._caches = None, {}

    def serve(self) -> None:
        ring = self.ring
        while True:
            header = ring.receive_header(ring.options.idle_timeout)
            if header.kind == STOP:
                ring.send(header)
                ring.flush()
                return
            ring.check(header)
            cache = self._cache(header)
            mask, x = ring.receive(((header.B, header.cached + header.T), torch.int64),
                                   ((header.B, header.T, self.geometry.hidden_size), self.transformer.dtype))
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ring.refuse("an attention mask that is not 0s and 1s")
            x = self._run(header, mask, x, cache)
            ring.flush()  # the previous micro-batch has left: at most one waits to leave
            if self.last:
                ring.send(header, x[:, -1:] if header.last_only else x)
            else:
                ring.send(header, mask, x)

    @torch.inference_mode()
    def _run(self, header: _Header, mask: torch.Tensor, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        t = self.transformer
        bias = t.attention_bias(mask, header.B, header.T, header.cached)
        with t.threads_for(header.B * header.T):
            return t.run(x, self.stage.layers, bias, cache, head=False)

    def _cache(self, header: _Header) -> KVCache:
        if header.cached == 0:
            if header.cache_id != self._cache_id:  # a new batch: the last one's caches go
                self._cache_id, self._caches = header.cache_id, {}
            self.transformer.checkpoint.check_room(header.B * header.capacity, self.transformer.dtype)
            self._caches[header.slot] = KVCache(self.geometry.n_layer, header.capacity)
        cache = self._caches.get(header.slot) if header.cache_id == self._cache_id else None
        if cache is None or cache.length != header.cached:
            raise self.ring.refuse(f"a pass continuing a cache this rank does not hold ({header})")
        return cache
