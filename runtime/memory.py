"""Memory limits: what a run needs besides its weights, the default RAM budget, and sizes as text.

A run's RAM budget covers everything the plan allocates: the weights held in RAM (pinned files and
the stream buffers, see `residency`), the KV cache of the tokens it is planned for, and the
working set of one forward pass over them. What comes on top is the process itself: the
interpreter and torch (about 150 MB of anonymous memory with torch 2.x), the tokenizer and the
allocator's slack, so a run's peak RssAnon stays within the budget plus about 300 MB.

The working set is counted for the kernels this runtime uses (bloomconv.kernels: none of them
widens a weight; without them torch converts one CONVERT_CHUNK_BYTES piece at a time), not for a
dequantized copy of a matrix:

    activations   16 · T · H · c      x, the layer norm, the fused qkv, the 4H-wide MLP input and
                                      its GELU, the kernels' copy of their input, outputs
    attention     3 · nh · T² · c     ALiBi bias + mask, scores and probabilities, (nh, T, S)
    sampling      8 · V · 4           the last position's logits, a sorted copy and its indices
    small tensors L · (13 H · c + 9 H · 4)   layer norms and biases converted to the compute dtype
                                      once, int8 row scales
    scratch       the 4-bit fp32 tile of the widest rows (4 H: `fourbit.tile_rows`) for more than
                  SMALL_BATCH_ROWS tokens (4-bit prefill); for more than PREFILL_ROWS, bf16
                  products' copies (`prefill_dtype`; counted whether or not the run asks for
                  them): as much again (the tile in bf16, the copy torch's bf16 GEMM packs),
                  10 · T · H (the widest product's input and its result in bf16) and a bf16
                  tile's product (bf16) and, for int8, its fp32 sums, 8 · T · tile_rows(H, 2);
                  3 × CONVERT_CHUNK_BYTES without the compiled kernels (torch converts pieces)

for T tokens (a prompt computed in one pass, or the cache's length), H hidden, nh heads, V vocab,
L blocks and c the compute dtype's size; the KV cache is 2 · L · H · T · c.

>>> parse_size("1.5GiB"), parse_size("800MB")                        # doctest: +SKIP
(1610612736, 800000000)
"""
from __future__ import annotations

import re

import torch

from bloomconv import kernels
from bloomconv.geometry import Geometry
from bloomconv.kernels import dense, fourbit
from bloomconv.process_stats import available_memory
from bloomconv.storage.fallback import CONVERT_CHUNK_BYTES

__all__ = ["DEFAULT_BUDGET_SHARE", "DEFAULT_MAX_TOKENS", "PREFILL_ROWS", "RUNTIME_OVERHEAD_BYTES",
           "default_ram_budget", "kv_cache_bytes", "parse_size", "working_set_bytes"]

# Default budget: this share of available memory, less the process's own RUNTIME_OVERHEAD_BYTES.
DEFAULT_BUDGET_SHARE = 0.9
# What the process allocates beyond the plan: the tokenizer, thread stacks, allocator slack (torch
# itself, ~150 MB, is already allocated when available memory is read).
RUNTIME_OVERHEAD_BYTES = 128 << 20
# Tokens (prompt + new, over the batch) a plan reserves KV cache and working set for, when the
# caller does not say (`bloomconv generate` does: prompt bytes + --max-new-tokens).
DEFAULT_MAX_TOKENS = 256
# More token rows than this in one pass (a prompt's prefill, a batch of over 64 sequences): the
# products, not reading the weights, are the cost, and run in the model's `prefill_dtype`; fewer
# (a decoding step) stay in the compute dtype, where the kernels read each weight once.
PREFILL_ROWS = max(dense.SMALL_BATCH_ROWS, fourbit.SMALL_BATCH_ROWS)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


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


def kv_cache_bytes(geometry: Geometry, dtype: torch.dtype, tokens: int) -> int:
    """Keys and values of every block for `tokens` tokens (summed over the batch)."""
    return 2 * geometry.n_layer * geometry.hidden_size * tokens * dtype.itemsize


def working_set_bytes(geometry: Geometry, dtype: torch.dtype, tokens: int) -> int:
    """Peak memory of a forward pass over `tokens` tokens at once besides weights and KV cache
    (the module's docstring lists the terms)."""
    c, h, v, n = dtype.itemsize, geometry.hidden_size, geometry.vocab_size, geometry.n_layer
    activations = 16 * tokens * h * c
    attention = 3 * geometry.n_head * tokens * tokens * c + 2 * tokens * tokens
    sampling = 8 * v * 4
    small_tensors = n * (13 * h * c + 9 * h * 4) + 4 * h * c
    widest = 4 * h  # dense_4h_to_h's row length (its in_features)
    tile = fourbit.tile_rows(widest) * widest * 4
    if not kernels.available():
        scratch = 3 * CONVERT_CHUNK_BYTES
    else:  # a prefill over more rows than the 4-bit kernel takes dequantizes a tile at a time
        scratch = tile if tokens > fourbit.SMALL_BATCH_ROWS else 0
    if tokens > PREFILL_ROWS:  # bf16 products (prefill_dtype), counted whatever the run's
        scratch += tile + 10 * tokens * h + 8 * tokens * fourbit.tile_rows(h, 2)
    return activations + attention + sampling + small_tensors + scratch


def default_ram_budget(available: int | None = None) -> int:
    """The budget when none is given: DEFAULT_BUDGET_SHARE of `available_memory()` (MemAvailable,
    or the memory cgroup's room where smaller) less RUNTIME_OVERHEAD_BYTES; negative when there
    is not even that much."""
    available = available_memory() if available is None else available
    return int(DEFAULT_BUDGET_SHARE * available) - RUNTIME_OVERHEAD_BYTES
