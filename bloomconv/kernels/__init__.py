"""bloomconv's compiled CPU kernels, shared by the converter and the runtime.

`fourbit` multiplies and dequantizes bitsandbytes' NF4/FP4 matrices straight from their packed
bytes and quantizes to them; `dense` multiplies by int8, bf16 and fp16 matrices as stored, in fp32;
`int8` quantizes to LLM.int8() rows. All live in one C extension, `_kernels` (built from csrc/ by
setup.py), so they share one thread pool: a decoding step alternates between the products, and two
pools would keep two sets of threads spinning on the same cores. This package imports nothing of
bloomconv but `format` and `errors`, so any part of bloomconv can use it.

What the kernels share is here: whether the extension was built (`available()`; where no C
compiler was found at install time, callers widen or dequantize weights and quantize with torch
instead), the instruction sets it can use on this CPU, whether the CPU multiplies bf16 natively
(`bf16_dot_products`, which decides the runtime's default prefill products), whether it has the
AMX tiles and int8 dot products a decoding step's products may use (`bf16_tiles`,
`int8_dot_products`), and how many threads it runs.

>>> from bloomconv import kernels
>>> kernels.available(), kernels.isas()                                  # doctest: +SKIP
(True, ('avx512', 'avx2', 'scalar'))
>>> with kernels.kernels_own_the_cores():                                # doctest: +SKIP
...     logits = model.forward(next_token)
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
from collections.abc import Iterator

import torch

from bloomconv.errors import QuantizationError

try:
    from . import _kernels
except ImportError:  # installed without a C compiler
    _kernels = None

__all__ = ["BF16_TILE_ROWS", "TILE_BATCH_ROWS", "available", "bf16_dot_products", "bf16_tiles", "int8_dot_products",
           "isas", "kernel_threads", "kernels_own_the_cores"]

_ISA_CODES = {None: 0, "scalar": 1, "avx2": 2, "avx512": 3}  # csrc/kernels.h's ISA_*

_KERNEL_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("bloomconv_kernel_threads",
                                                                           default=None)


def available() -> bool:
    """Whether the compiled kernels are installed (their portable C code runs on any CPU)."""
    return _kernels is not None


def isas() -> tuple[str, ...]:
    """Instruction sets the kernels can use on this CPU, fastest first, e.g. ("avx512", "avx2", "scalar")."""
    return _kernels.isas() if _kernels is not None else ()


def bf16_dot_products() -> bool:
    """Whether this CPU multiplies bf16 pairs into fp32 sums in one instruction (AVX512-BF16), as
    torch's bf16 GEMM then does; False where the kernels were not built (the CPU is not asked)."""
    return _kernels is not None and _kernels.bf16_dot_products()


@functools.cache
def bf16_tiles() -> bool:
    """Whether the kernels multiply bf16 on AMX tiles here (AMX-BF16, and the OS lets the process
    use the tile registers; asked once): a batched decoding step's bf16 products (csrc/tiles.c)."""
    return _kernels is not None and _kernels.amx_bf16_tiles()


@functools.cache
def int8_dot_products() -> bool:
    """Whether this CPU sums products of int8 bytes in one instruction (AVX512-VNNI `vpdpbusd`), as
    the 4-bit kernel's int8 activations need (`fourbit.takes_int8_activations`); asked once."""
    return _kernels is not None and _kernels.int8_dot_products()


# From this many rows of bf16 x, AMX tiles beat the fp32 kernels (with fewer, x has too few rows to
# pay for a tile: 3 rows of 4-bit weights cost the same both ways; bench/bench_kernels.py), up to
# the most the tile kernel takes (4 tiles of 16 rows of x; csrc/tiles.c).
BF16_TILE_ROWS = 4
TILE_BATCH_ROWS = 64


def kernel_threads() -> int:
    """Threads the compiled kernels use: torch.get_num_threads(), or what `kernels_own_the_cores` set."""
    return _KERNEL_THREADS.get() or torch.get_num_threads()


# How long the kernels' helper threads wait for the next call, spinning, while they own the cores:
# longer than the gaps between a decoding step's kernel calls (csrc/parallel.c).
STEP_SPIN_NANOSECONDS = 100_000


@contextlib.contextmanager
def kernels_own_the_cores() -> Iterator[None]:
    """Run torch's own ops on one thread while the compiled kernels keep torch's thread count.

    For a decoding step, where the kernels do the heavy work and torch's ops are tiny: torch's
    OpenMP workers spin-wait after each op, on the very cores the kernels' threads need. The
    kernels' helpers in turn spin between calls for STEP_SPIN_NANOSECONDS instead of going to
    sleep (waking one costs about as much as a small product).
    """
    threads = torch.get_num_threads()
    token = _KERNEL_THREADS.set(threads)
    spin = _kernels.helpers_spin(STEP_SPIN_NANOSECONDS) if _kernels is not None else None
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _KERNEL_THREADS.reset(token)
        if spin is not None:
            _kernels.helpers_spin(spin)


def _isa_code(isa: str | None) -> int:
    """The extension's code for instruction set `isa` (None: the fastest), or a typed error when the
    extension was not built or this CPU lacks `isa`."""
    if _kernels is None:
        raise QuantizationError("weight", "the compiled kernels are not installed (no C compiler at install time)",
                                "Check bloomconv.kernels.available() first, or reinstall with gcc.")
    if isa is not None and isa not in _kernels.isas():
        raise QuantizationError("weight", f"instruction set {isa!r} is not available on this CPU",
                                f"Use one of {', '.join(_kernels.isas())}, or None for the fastest.")
    return _ISA_CODES[isa]
