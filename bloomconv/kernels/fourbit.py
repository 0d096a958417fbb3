"""Fused 4-bit dequantize-and-multiply on CPU for bitsandbytes' NF4/FP4 weights.

`fourbit_matmul(x, matrix)` computes `x @ W.T` straight from the packed bytes: each weight is
decoded in registers, scaled by its block's absmax and multiplied into x, so a decode step (batch
1) reads the packed matrix once instead of writing and re-reading a full fp32 copy
(`F.linear(x, dequantize_4bit(...))`, which costs far more than the multiply itself).

Why C (csrc/fourbit.c, in the `_kernels` extension) and not the alternatives: nothing in torch
multiplies 4-bit codes on an AVX2 CPU (bitsandbytes' fused CPU kernel needs AVX512-BF16 and a
separate download), and `torch.compile` of the unpack and lookup was no faster than dequantizing
first. A torch C++ extension would tie the build to torch's headers and ninja; plain CPython taking
`data_ptr()`s builds in seconds with any C compiler and needs no torch at build time.

How: AVX2 decodes 32 codes (16 bytes) per step with `vpshufb` table lookups, 4 for the byte planes
of the fp32 code table then byte/word interleaves; for weights quantized from bf16 (BLOOM's) each
block first builds the table of its 16 possible bf16 weights, so a step is 2 lookups and no
multiply. With AVX-512 (decoding steps: x in groups of 8 rows, over slabs of columns that stay in
L1) the block's 16 possible weights fill
one register and a code becomes its weight with one `vpermps`: 16 packed bytes widened to dwords, a
shift, two permutes per 32 weights, far fewer instructions than with AVX2 (bench/bench_kernels.py
times the kernels against the alternatives). Every weight is exactly `code[q] * absmax` in fp32,
rounded to the dtype the matrix was quantized from, as `dequantize_4bit` (bloomconv.storage)
computes it; only the order of the fp32 sums differs from multiplying the dequantized matrix.
Portable C (a per-block table, two weights per byte) runs elsewhere, and on rows whose length is not
a multiple of 32. Rows are shared out among `kernel_threads()` threads.

Batches: up to SMALL_BATCH_ROWS rows of x share each decoded weight (decoded once per call); a
larger batch (prefill) is compute-bound, so the matrix is dequantized a tile at a time (about
DEQUANTIZE_TILE_BYTES, in whole TILE_ROWS: `tile_rows`), by the same C code, and each tile goes
to torch's GEMM in one call (in bf16 for bf16 x: `fourbit_matmul`). bf16 x of BF16_TILE_ROWS to
TILE_BATCH_ROWS rows (a batched decoding step whose caller chose bf16 products) multiplies on AMX
tiles where the CPU has them (`bf16_tiles`): 16 weight rows by 32 columns decoded as above into
one tile, times x's tiles, fp32 sums kept in tile registers across the row; decoding, not
multiplying, is then the cost, as at batch 1.
A decoding step of fewer than BF16_TILE_ROWS rows may ask for int8 activations instead
(`takes_int8_activations`: blocks of 32, AVX512-VNNI), as llama.cpp multiplies its 4-bit formats:
x rounded to int8 per 32 columns, the 16 codes to int8, 64 byte products summed per instruction
(`vpdpbusd`) exactly in int32, each block's sum then scaled in fp32; without the table of bf16
weights per block and the permutes, the kernel is bound by memory rather than by instructions.
Double-quantized absmax is decoded inside the kernel per block, so nothing is cached and no fp32
absmax vector is materialised.

The caller builds the `FourBitMatrix` from what it stored (this module reads no stored names or
quant-state blobs). Where the extension did not build, `bloomconv.kernels.available()` is False
and callers dequantize instead.

>>> rows, cols, block = 64, 128, 64
>>> matrix = FourBitMatrix(packed=torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8),
...                        absmax=torch.rand(rows * cols // block), code=torch.linspace(-1, 1, 16),
...                        block_size=block, shape=(rows, cols), weight_dtype=torch.bfloat16)
>>> fourbit_matmul(torch.randn(3, cols), matrix).shape                   # doctest: +SKIP
torch.Size([3, 64])
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from bloomconv.errors import QuantizationError
from bloomconv.format import BLOCK_SIZES_4BIT, NESTED_BLOCK_SIZE

from . import BF16_TILE_ROWS, TILE_BATCH_ROWS, _isa_code, _kernels, bf16_tiles, int8_dot_products, kernel_threads

__all__ = ["DEQUANTIZE_TILE_BYTES", "SMALL_BATCH_ROWS", "FourBitMatrix", "NestedAbsmax", "fourbit_dequantize",
           "fourbit_matmul", "fourbit_quantize_blocks", "multiplies_on_tiles", "takes_int8_activations", "tile_rows"]

# Rows of x multiplied by the fused kernel; a larger batch dequantizes tiles for torch's GEMM, which
# wins once the multiply, not reading the weight, is the cost: around 32 rows the two cost the same.
SMALL_BATCH_ROWS = 32
DEQUANTIZE_TILE_BYTES = 8 * 1024 * 1024  # fp32 tile for the large-batch path
# A large-batch tile holds a whole multiple of this many rows (at least one): one GEMM call per
# tile, as large as DEQUANTIZE_TILE_BYTES allows, since larger calls are faster.
TILE_ROWS = 256

_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/fourbit.c's ROUND_*


@dataclasses.dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantized absmax: block b's scale is `code[codes[b]] * absmax[b // 256] + offset`."""

    codes: torch.Tensor   # (nblocks,) uint8
    absmax: torch.Tensor  # (ceil(nblocks / 256),) fp32
    code: torch.Tensor    # (256,) fp32: bitsandbytes' dynamic map
    offset: float


@dataclasses.dataclass(frozen=True)
class FourBitMatrix:
    """One 4-bit matrix as the kernels read it, in bitsandbytes' layout (what quantize_4bit stores).

    Checked on construction: each tensor's dtype, size, contiguity and device must match `shape`
    and `block_size`, so the kernels can read them by address.
    """

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
        fix = ("Build the matrix from the tensors quantize_4bit stored (flattened) and the state in its "
               "quant_state blob.")
        if self.block_size not in BLOCK_SIZES_4BIT or self.weight_dtype not in _ROUNDING or min(rows, cols) < 0:
            raise QuantizationError("weight", f"unsupported 4-bit matrix: block size {self.block_size}, "
                                    f"dtype {self.weight_dtype}, shape {self.shape}", fix)
        for name, tensor, dtype, numel in expected:
            if (tensor.dtype != dtype or tensor.numel() != numel or not tensor.is_contiguous()
                    or tensor.device.type != "cpu"):
                raise QuantizationError(f"weight.{name}", f"is {tensor.dtype} with {tensor.numel()} elements "
                                        f"on {tensor.device} (contiguous: {tensor.is_contiguous()}); a "
                                        f"{rows}×{cols} matrix needs {numel} contiguous {dtype} on the CPU", fix)

    @functools.cached_property
    def _arguments(self) -> tuple:
        """csrc/fourbit.c's MATRIX_FORMAT arguments (computed once: a decoding step multiplies each
        matrix once per token)."""
        if isinstance(self.absmax, NestedAbsmax):
            n = self.absmax
            absmax = (0, n.codes.data_ptr(), n.absmax.data_ptr(), n.code.data_ptr(), n.offset, NESTED_BLOCK_SIZE)
        else:
            absmax = (self.absmax.data_ptr(), 0, 0, 0, 0.0, 0)
        return (self.packed.data_ptr(), *self.shape, self.block_size, self.code.data_ptr(), *absmax,
                _ROUNDING[self.weight_dtype])


def multiplies_on_tiles(batch: int, matrix: FourBitMatrix) -> bool:
    """Whether `batch` rows of bf16 x times `matrix` go to the AMX kernel (`fourbit_matmul`)."""
    return (BF16_TILE_ROWS <= batch <= TILE_BATCH_ROWS and matrix.weight_dtype == torch.bfloat16
            and matrix.shape[1] % 32 == 0 and bf16_tiles())


def takes_int8_activations(batch: int, matrix: FourBitMatrix) -> bool:
    """Whether `batch` rows of x times `matrix` can multiply with int8 activations (`fourbit_matmul`):
    fewer than BF16_TILE_ROWS rows (from there on AMX tiles or the fp32 kernels multiply), blocks
    of 32 (each block one int32 sum), rows of a multiple of 128 elements, AVX512-VNNI."""
    return (1 <= batch < BF16_TILE_ROWS and matrix.block_size == 32 and matrix.shape[1] % 128 == 0
            and int8_dot_products())


def tile_rows(cols: int, element_size: int = 4) -> int:
    """Rows of the tile the large-batch path dequantizes at a time for rows of `cols` elements of
    `element_size` bytes (fp32 4, bf16 2): about DEQUANTIZE_TILE_BYTES, in whole TILE_ROWS (at
    least one). A bf16 tile holds twice an fp32 one's rows: fewer, larger GEMM calls, and fewer
    calls to the dequantizer, whose helper thread waits for the cores torch's threads spin on
    after each GEMM."""
    return max(1, DEQUANTIZE_TILE_BYTES // (element_size * cols) // TILE_ROWS) * TILE_ROWS


def fourbit_matmul(x: torch.Tensor, matrix: FourBitMatrix, *, isa: str | None = None,
                   int8_activations: bool = False) -> torch.Tensor:
    """x @ W.T for the 4-bit matrix W: x (..., in) of any float dtype -> (..., out), fp32 sums of
    fp32 products, the result fp32.

    More than SMALL_BATCH_ROWS rows of bf16 x multiply in bf16 instead, and the result is bf16:
    tiles of weights quantized from bf16 are dequantized straight to bf16 (exact; others are
    rounded to it) for torch's bf16 GEMM, twice the fp32 GEMM's rate where the CPU has bf16 dot
    products. bf16 x of BF16_TILE_ROWS to TILE_BATCH_ROWS rows, where `multiplies_on_tiles`, multiplies
    on AMX tiles instead: weights quantized from bf16, bf16 products, and the fp32 sums come back
    as they are (fp32).

    `int8_activations` (only where `takes_int8_activations`): x rounded to int8 per 32 columns (by
    its absmax / 127) and the codes to int8 (code * 127 / max|code|), multiplied as llama.cpp
    multiplies its 4-bit formats: each block's sum exact in int32, then scaled in fp32. The result
    is not fp32 products' (x's rounding, mostly; README "Int8 activations in small decoding
    steps" measures what it costs); a row's result does not depend on the other rows.

    Uses `kernel_threads()` threads. `isa` forces an instruction set from `bloomconv.kernels.isas()`
    (the default takes the fastest; rows whose length is not a multiple of 32 always run scalar code).
    """
    rows, cols = matrix.shape
    if x.shape[-1] != cols:
        raise QuantizationError("weight", f"cannot multiply x of shape {tuple(x.shape)} by a {rows}×{cols} "
                                "matrix", f"Pass activations whose last dimension is {cols}.")
    isa_code = _isa_code(isa)
    batch = x.shape[:-1].numel()
    if int8_activations and (isa is not None or not takes_int8_activations(batch, matrix)):
        raise QuantizationError("weight", f"int8 activations do not take {batch} rows of x times a {rows}×{cols} matrix "
                                f"in blocks of {matrix.block_size} on this CPU (or a forced instruction set)",
                                "Check takes_int8_activations first; they choose their own instructions (VNNI).")
    # fp32 products, but bf16 ones for bf16 rows on AMX tiles, or many of them (torch's bf16 GEMM)
    tiles = isa is None and x.dtype == torch.bfloat16 and multiplies_on_tiles(batch, matrix)
    gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and batch > SMALL_BATCH_ROWS and not tiles else torch.float32
    flat = x.reshape(batch, cols).to(device="cpu", dtype=gemm_dtype).contiguous()       # (M, in)
    out = torch.empty(batch, rows, dtype=gemm_dtype)                                    # (M, out)
    if out.numel() == 0 or cols == 0:
        return out.zero_().reshape(*x.shape[:-1], rows)
    if int8_activations:
        _kernels.fourbit_matmul_int8_activations(flat.data_ptr(), batch, out.data_ptr(), kernel_threads(), isa_code,
                                                 *matrix._arguments)
    elif tiles:  # flat holds x exactly
        _kernels.fourbit_matmul_bf16_tiles(flat.data_ptr(), batch, out.data_ptr(), kernel_threads(), isa_code,
                                           *matrix._arguments)
    elif batch <= SMALL_BATCH_ROWS:
        _kernels.fourbit_matmul(flat.data_ptr(), batch, out.data_ptr(), kernel_threads(), isa_code,
                                *matrix._arguments)
    else:
        # weights quantized from bf16 dequantize straight to bf16 for bf16 products; others are rounded
        direct = gemm_dtype == torch.bfloat16 and matrix.weight_dtype == torch.bfloat16
        tile_dtype = gemm_dtype if direct else torch.float32
        step = tile_rows(cols, tile_dtype.itemsize)
        tile = torch.empty(min(step, rows), cols, dtype=tile_dtype)                          # (step, in)
        for start in range(0, rows, step):
            ids = torch.arange(start, min(start + step, rows))
            _dequantize_into(matrix, ids, tile[:ids.numel()], isa_code)
            out[:, start:start + ids.numel()] = F.linear(flat, tile[:ids.numel()].to(gemm_dtype))
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
                            order: torch.Tensor | None, *, absmax: torch.Tensor | None = None,
                            packed: torch.Tensor | None = None, codes: bool = True,
                            isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' CPU 4-bit quantizer on flat `values` (whole blocks, plus the tensor's partial
    tail if it ends there): (absmax fp32 [nblocks], packed uint8 [ceil(n/2)]), bit for bit what
    `_quantize_4bit_chunk` (bloomconv.storage) computes, in one pass over the input (bf16 is read as
    is; other dtypes are cast to fp32 first), blocks shared out among `kernel_threads()` threads.
    A non-finite value gives its block a non-finite absmax. `bounds`: the 15 midpoints of the sorted
    code; `order`: sorted position -> code (uint8) or None. `absmax` and `packed` may be given
    (contiguous, preallocated) to be filled; with `codes=False` only the absmax are computed and
    packed is None.
    """
    isa_code = _isa_code(isa)
    if values.dtype not in (torch.bfloat16, torch.float32):
        values = values.float()
    values = values.reshape(-1).contiguous()
    bounds = bounds.to(torch.float32).contiguous()
    if bounds.numel() != 15 or (order is not None and (order.dtype != torch.uint8 or order.numel() != 16)):
        raise QuantizationError("weight", "the 4-bit quantizer needs 15 bounds and 16 uint8 codes",
                                "Pass the midpoints of the sorted code table and its sort order (or None).")
    n = values.numel()
    absmax = _output(absmax, -(-n // block_size), torch.float32, "absmax")
    packed = _output(packed, (n + 1) // 2, torch.uint8, "packed") if codes else None
    if n:
        _kernels.fourbit_quantize(values.data_ptr(), values.dtype == torch.bfloat16, n, block_size, bounds.data_ptr(),
                                  0 if order is None else order.contiguous().data_ptr(), absmax.data_ptr(),
                                  0 if packed is None else packed.data_ptr(), kernel_threads(), isa_code)
    return absmax, packed


def _output(tensor: torch.Tensor | None, numel: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A preallocated output checked for size and layout, or a new one."""
    if tensor is None:
        return torch.empty(numel, dtype=dtype)
    if tensor.dtype != dtype or tensor.numel() != numel or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise QuantizationError("weight", f"{name} is {tensor.dtype} with {tensor.numel()} elements; the quantizer "
                                f"writes {numel} contiguous {dtype} on the CPU", "Preallocate it with torch.empty.")
    return tensor.view(-1)


def _dequantize_into(matrix: FourBitMatrix, ids: torch.Tensor, out: torch.Tensor, isa_code: int) -> None:
    """Rows `ids` into `out`: fp32, or bf16 for a matrix whose weights are rounded to bf16."""
    _kernels.fourbit_dequantize(ids.data_ptr(), ids.numel(), out.data_ptr(), kernel_threads(), isa_code,
                                *matrix._arguments, out.dtype == torch.bfloat16)
