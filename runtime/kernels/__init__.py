"""Fused 4-bit dequantize-and-multiply on CPU for bitsandbytes' NF4/FP4 weights.

`fourbit_matmul(x, matrix)` computes `x @ W.T` straight from the packed bytes: each weight is
decoded in registers, scaled by its block's absmax and multiplied into x, so a decode step (batch
1) reads the matrix once, at several GB/s, instead of writing and re-reading a full fp32 copy
(`F.linear(x, dequantize_4bit(...))`: 0.05-0.2 GB/s of packed weight here).

Why a small C extension (`_fourbit`, built from fourbit.c by setup.py) and not the alternatives:
nothing in torch multiplies 4-bit codes on an AVX2 CPU (bitsandbytes' fused CPU kernel needs
AVX512-BF16 and a download, see notes/bitsandbytes-on-cpu.md), and `torch.compile` of the unpack
and lookup ran at ~0.05 GB/s. A torch C++ extension would tie the build to torch's headers and
ninja; plain CPython taking `data_ptr()`s builds in a second with any C compiler and needs no torch
at build time.

How: AVX2 decodes 32 codes (16 bytes) per step with `vpshufb` table lookups, 4 for the byte planes
of the fp32 code table then byte/word interleaves; for weights quantized from bf16 (BLOOM's) each
block first builds the table of its 16 possible bf16 weights, so a step is 2 lookups and no
multiply. With AVX-512 (up to 4 rows of x, i.e. decoding steps) the block's 16 possible weights
fill one register and a code becomes its weight with one `vpermps`: 16 packed bytes widened to
dwords, a shift, two permutes per 32 weights. bloom-560m's 250880×1024 nf4 lm_head at batch 1:
18.1 ms with AVX2, 9.0 ms with AVX-512 (16 GB/s of packed weight; bench/bench_kernels.py, 2
threads). Every weight is exactly `code[q] * absmax` in fp32, rounded to the dtype the matrix was
quantized from, as `bloomconv.quant.dequantize_4bit` computes it; only the order of the fp32 sums
differs from multiplying the dequantized matrix. Portable C (a per-block table, two weights per
byte) runs elsewhere, and on rows whose length is not a multiple of 32. Rows are shared out among
kernel_threads() threads.

Batches: up to SMALL_BATCH_ROWS rows of x share each decoded weight (decoded once per call); a
larger batch (prefill) is compute-bound, so the matrix is dequantized DEQUANTIZE_TILE_BYTES at a
time, by the same C code, and each tile goes to torch's GEMM. Double-quantized absmax is decoded
inside the kernel per block, so nothing is cached and no fp32 absmax vector is materialised.

Where the extension did not build (no C compiler at install time), `available()` is False and
callers dequantize instead (bloomconv.runtime.weights.FourBitWeight does this).

>>> from bloomconv.quant import quantize_4bit
>>> matrix = FourBitMatrix.from_stored(quantize_4bit(torch.randn(64, 128), "nf4", block_size=64))
>>> fourbit_matmul(torch.randn(3, 128), matrix).shape                    # doctest: +SKIP
torch.Size([3, 64])
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from bloomconv.errors import QuantizationError
from bloomconv.format import (NESTED_ABSMAX_SUFFIX, NESTED_QUANT_MAP_SUFFIX, QUANT_ABSMAX_SUFFIX,
                              QUANT_STATE_SUFFIX_TEMPLATE, QuantType)
from bloomconv.quant import BLOCK_SIZES, NESTED_BLOCK_SIZE, FourBitState, code_table

try:
    from . import _fourbit
except ImportError:  # installed without a C compiler
    _fourbit = None

__all__ = ["DEQUANTIZE_TILE_BYTES", "SMALL_BATCH_ROWS", "FourBitMatrix", "NestedAbsmax", "available",
           "fourbit_dequantize", "fourbit_matmul", "fourbit_quantize_blocks", "isas", "kernel_threads",
           "kernels_own_the_cores"]

# Rows of x multiplied by the fused kernel; a larger batch dequantizes tiles for torch's GEMM, which
# wins once the multiply, not reading the weight, is the cost. At 32 rows the two took about as long
# here (4096×1024, 1 thread: 4-5 ms each, as did fp32 F.linear); at 16 the kernel took 2-2.7 ms.
SMALL_BATCH_ROWS = 32
DEQUANTIZE_TILE_BYTES = 8 * 1024 * 1024  # fp32 tile for the large-batch path

_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # fourbit.c's ROUND_*
_ISA_CODES = {None: 0, "scalar": 1, "avx2": 2, "avx512": 3}         # fourbit.c's ISA_*


_KERNEL_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("bloomconv_kernel_threads",
                                                                           default=None)


def kernel_threads() -> int:
    """Threads the compiled kernels use: torch.get_num_threads(), or what `kernels_own_the_cores` set."""
    return _KERNEL_THREADS.get() or torch.get_num_threads()


@contextlib.contextmanager
def kernels_own_the_cores() -> Iterator[None]:
    """Run torch's own ops on one thread while the compiled kernels keep torch's thread count.

    For a decoding step, where the kernels do the heavy work and torch's ops are tiny: torch's
    OpenMP workers spin-wait after each op, and on the cores the kernels' threads need they slowed
    a bloom-560m int8 step from 35 to 39 ms here (62 vs 42 ms with other jobs on the machine).
    """
    threads = torch.get_num_threads()
    token = _KERNEL_THREADS.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _KERNEL_THREADS.reset(token)


def available() -> bool:
    """Whether the compiled kernels are installed (the scalar one runs on any CPU)."""
    return _fourbit is not None


def isas() -> tuple[str, ...]:
    """Instruction sets the kernels can use on this CPU, fastest first, e.g. ("avx512", "avx2", "scalar")."""
    return _fourbit.isas() if _fourbit is not None else ()


@dataclasses.dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantized absmax: block b's scale is `code[codes[b]] * absmax[b // 256] + offset`."""

    codes: torch.Tensor   # (nblocks,) uint8
    absmax: torch.Tensor  # (ceil(nblocks / 256),) fp32
    code: torch.Tensor    # (256,) fp32: bitsandbytes' dynamic map
    offset: float


@dataclasses.dataclass(frozen=True)
class FourBitMatrix:
    """One 4-bit matrix as the kernels read it; `from_stored` builds it from what quantize_4bit wrote."""

    packed: torch.Tensor                  # (ceil(out*in/2),) uint8, element 2i in the high nibble
    absmax: torch.Tensor | NestedAbsmax   # (nblocks,) fp32 per block of the flattened matrix
    code: torch.Tensor                    # (16,) fp32
    block_size: int
    shape: tuple[int, int]                # (out, in)
    weight_dtype: torch.dtype = torch.float32  # each code·absmax is rounded to it, as dequantize_4bit does

    def __post_init__(self):
        rows, cols = self.shape
        blocks = -(-rows * cols // self.block_size)
        nested = self.absmax if isinstance(self.absmax, NestedAbsmax) else None
        expected = [("packed", self.packed, torch.uint8, (rows * cols + 1) // 2),
                    ("code", self.code, torch.float32, 16)]
        if nested is None:
            expected.append(("absmax", self.absmax, torch.float32, blocks))
        else:
            expected += [("absmax", nested.codes, torch.uint8, blocks),
                         ("nested_absmax", nested.absmax, torch.float32, -(-blocks // NESTED_BLOCK_SIZE)),
                         ("nested_quant_map", nested.code, torch.float32, 256)]
        fix = "Build the matrix with FourBitMatrix.from_stored from what quantize_4bit stored."
        if self.block_size not in BLOCK_SIZES or self.weight_dtype not in _ROUNDING or min(rows, cols) < 0:
            raise QuantizationError("weight", f"unsupported 4-bit matrix: block size {self.block_size}, "
                                    f"dtype {self.weight_dtype}, shape {self.shape}", fix)
        for name, tensor, dtype, numel in expected:
            if (tensor.dtype != dtype or tensor.numel() != numel or not tensor.is_contiguous()
                    or tensor.device.type != "cpu"):
                raise QuantizationError(f"weight.{name}", f"is {tensor.dtype} with {tensor.numel()} elements "
                                        f"on {tensor.device} (contiguous: {tensor.is_contiguous()}); a "
                                        f"{rows}×{cols} matrix needs {numel} contiguous {dtype} on the CPU", fix)

    @classmethod
    def from_stored(cls, stored: Mapping[str, torch.Tensor]) -> "FourBitMatrix":
        """From `quantize_4bit`'s keys (`weight`, `weight.absmax`, …), memory-mapped or not; no copy."""
        state = _state(stored)
        if len(state.shape) != 2:
            raise QuantizationError("weight", f"has shape {state.shape}; the kernels multiply 2-D matrices",
                                    "Use bloomconv.quant.dequantize_4bit for other shapes.")
        absmax = stored[f"weight.{QUANT_ABSMAX_SUFFIX}"].reshape(-1)
        if state.nested:
            absmax = NestedAbsmax(absmax, stored[f"weight.{NESTED_ABSMAX_SUFFIX}"].reshape(-1),
                                  stored[f"weight.{NESTED_QUANT_MAP_SUFFIX}"].reshape(-1), state.nested_offset)
        return cls(stored["weight"].reshape(-1), absmax, code_table(state.quant_type), state.block_size,
                   state.shape, state.dtype)

    def _arguments(self) -> tuple:
        """fourbit.c's MATRIX_FORMAT arguments."""
        if isinstance(self.absmax, NestedAbsmax):
            n = self.absmax
            absmax = (0, n.codes.data_ptr(), n.absmax.data_ptr(), n.code.data_ptr(), n.offset, NESTED_BLOCK_SIZE)
        else:
            absmax = (self.absmax.data_ptr(), 0, 0, 0, 0.0, 0)
        return (self.packed.data_ptr(), *self.shape, self.block_size, self.code.data_ptr(), *absmax,
                _ROUNDING[self.weight_dtype])


def fourbit_matmul(x: torch.Tensor, matrix: FourBitMatrix, *, isa: str | None = None) -> torch.Tensor:
    """x @ W.T in fp32 for the 4-bit matrix W: x (..., in) of any float dtype -> (..., out) fp32.

    Uses `kernel_threads()` threads. `isa` forces an instruction set from `isas()` (the
    default takes the fastest; rows whose length is not a multiple of 32 always run scalar code).
    """
    rows, cols = matrix.shape
    if x.shape[-1] != cols:
        raise QuantizationError("weight", f"cannot multiply x of shape {tuple(x.shape)} by a {rows}×{cols} "
                                "matrix", f"Pass activations whose last dimension is {cols}.")
    isa_code = _isa_code(isa)
    flat = x.reshape(-1, cols).to(device="cpu", dtype=torch.float32).contiguous()        # (M, in)
    batch = flat.shape[0]
    out = torch.empty(batch, rows, dtype=torch.float32)                                 # (M, out)
    if out.numel() == 0 or cols == 0:
        return out.zero_().reshape(*x.shape[:-1], rows)
    if batch <= SMALL_BATCH_ROWS:
        _fourbit.matmul(flat.data_ptr(), batch, out.data_ptr(), kernel_threads(), isa_code,
                        *matrix._arguments())
    else:
        step = max(1, DEQUANTIZE_TILE_BYTES // (4 * cols))
        tile = torch.empty(min(step, rows), cols, dtype=torch.float32)                  # (step, in)
        for start in range(0, rows, step):
            ids = torch.arange(start, min(start + step, rows))
            _dequantize_into(matrix, ids, tile[:ids.numel()], isa_code)
            out[:, start:start + ids.numel()] = F.linear(flat, tile[:ids.numel()])
    return out.reshape(*x.shape[:-1], rows)


def fourbit_dequantize(matrix: FourBitMatrix, rows: torch.Tensor | None = None, *,
                       isa: str | None = None) -> torch.Tensor:
    """Weight rows (all by default) as fp32 (len(rows), in): bit for bit `dequantize_4bit(...)[rows]`
    computed in fp32 (values of `matrix.weight_dtype`)."""
    count = matrix.shape[0]
    ids = torch.arange(count) if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and (ids.min() < 0 or ids.max() >= count):
        raise IndexError(f"row ids must lie in [0, {count}); got {ids.min().item()}..{ids.max().item()}")
    out = torch.empty(ids.numel(), matrix.shape[1], dtype=torch.float32)
    if out.numel():
        _dequantize_into(matrix, ids, out, _isa_code(isa))
    return out


def fourbit_quantize_blocks(values: torch.Tensor, block_size: int, bounds: torch.Tensor,
                            order: torch.Tensor | None, *, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 4-bit quantizer on flat `values` (whole blocks, plus the tensor's partial
    tail if it ends there): (absmax fp32 [nblocks], packed uint8 [ceil(n/2)]), bit for bit what
    `bloomconv.quant._quantize_4bit_chunk` computes, in one pass over the input (bf16 is read as
    is; other dtypes are cast to fp32 first). A non-finite value gives its block a non-finite absmax.
    `bounds`: the 15 midpoints of the sorted code; `order`: sorted position -> code (uint8) or None.
    """
    isa_code = _isa_code(isa)
    if values.dtype not in (torch.bfloat16, torch.float32):
        values = values.float()
    values = values.reshape(-1).contiguous()
    bounds = bounds.to(torch.float32).contiguous()
    if bounds.numel() != 15 or (order is not None and (order.dtype != torch.uint8 or order.numel() != 16)):
        raise QuantizationError("weight", "the 4-bit quantizer needs 15 bounds and 16 uint8 codes",
                                "Pass bloomconv.quant's bucket bounds for the quant type.")
    n = values.numel()
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    if n:
        _fourbit.quantize(values.data_ptr(), values.dtype == torch.bfloat16, n, block_size, bounds.data_ptr(),
                          0 if order is None else order.contiguous().data_ptr(), absmax.data_ptr(),
                          packed.data_ptr(), isa_code)
    return absmax, packed


def _dequantize_into(matrix: FourBitMatrix, ids: torch.Tensor, out: torch.Tensor, isa_code: int) -> None:
    _fourbit.dequantize(ids.data_ptr(), ids.numel(), out.data_ptr(), kernel_threads(), isa_code,
                        *matrix._arguments())


def _isa_code(isa: str | None) -> int:
    return isa_code(_fourbit, "4-bit kernels", "available()", _ISA_CODES, isa)


def isa_code(extension, what: str, check: str, codes: dict, isa: str | None) -> int:
    """The C code of instruction set `isa` (None: the fastest) for a kernel module, or a typed error
    when the module was not built or this CPU lacks `isa`. Shared with dense.py."""
    if extension is None:
        raise QuantizationError("weight", f"the {what} are not installed (no C compiler at install time)",
                                f"Check bloomconv.runtime.kernels.{check} first, or reinstall with gcc.")
    if isa is not None and isa not in extension.isas():
        raise QuantizationError("weight", f"instruction set {isa!r} is not available on this CPU",
                                f"Use one of {', '.join(extension.isas())}, or None for the fastest.")
    return codes[isa]


def _state(stored: Mapping[str, torch.Tensor]) -> FourBitState:
    for quant_type in (QuantType.NF4, QuantType.FP4):
        blob = stored.get(f"weight.{QUANT_STATE_SUFFIX_TEMPLATE.format(quant_type=quant_type.value)}")
        if blob is not None:
            return FourBitState.from_blob(blob)
    raise QuantizationError("weight", "has no quant_state blob", "Pass every tensor quantize_4bit stored.")
