"""LLM.int8() vector-wise weights, in bitsandbytes' layout: `<module>.weight` int8 (out, in) and
`<module>.SCB` fp32 (out,), each row's absmax, so a row's scale is SCB / 127.

What `Linear8bitLt` / transformers store, bit for bit (tests/test_quant.py checks against
bitsandbytes itself)::

    quantize_int8(W, "source")   == F.int8_vectorwise_quant(W, threshold=0.0)[:2]
    quantize_int8(W, "float16")  == the same of W.half(): what Linear8bitLt/transformers store
    dequantize_int8(CB, SCB, dt) == F.int8_vectorwise_dequant(CB, SCB).to(dt)

Decoding steps multiply through the dense kernel (int8 widened in registers, fp32 sums, each
row's sum scaled by SCB / 127); a bf16 prefill through torch's bf16 GEMM on the codes.

>>> w = torch.randn(8, 64, dtype=torch.bfloat16)
>>> CB, SCB = quantize_int8(w)
>>> (dequantize_int8(CB, SCB, torch.bfloat16) - w).abs().max() <= SCB.max() / 127
tensor(True)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bloomconv import kernels
from bloomconv.errors import QuantizationError
from bloomconv.format import INT8_SCALE_FROM, INT8_SCALE_SUFFIX, QuantType
from bloomconv.kernels import dense, fourbit
from bloomconv.kernels import int8 as int8_kernel
from bloomconv.safetensors_io import StreamedTensor, tensor_bytes
from bloomconv.settings import QuantSettings

from .base import (CHUNK_ELEMENTS, NO_REPORT, STREAM_PIECE_ELEMENTS, Lookup, ReadReport, Storage, check_float_weight,
                   register, slice_granularity)
from .fallback import dense_kernel_takes, dense_on_tiles, linear_in_pieces, products_in

__all__ = ["Int8Grid", "Int8Storage", "Int8Weight", "check_int8_weight", "dequantize_int8", "int8_codes", "quantize_int8",
           "quantize_int8_rows", "searched_row_scales"]

_INT8_DEQUANT_SCALE = 7.874015718698502e-3  # 1/127 exactly as bitsandbytes writes it
# torch._weight_int8pack_mm (CPU) needs rows of a multiple of 16 bytes and a weight starting on a
# 16-byte boundary: otherwise it returns garbage or segfaults. Found by testing, not documented.
_INT8PACK_ALIGN = 16


def quantize_int8(weight: torch.Tensor, scale_from: str = "float16", *, method: str = "rtn", name: str = "weight",
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() vector-wise quantization of a 2-D weight: (CB int8 [out, in], SCB float32 [out]).

    SCB is each row's absmax (not absmax/127); CB = round-half-even(w * (127/SCB)) in fp32. An
    all-zero row gives SCB 0 and CB 0. A row whose absmax is below 127/FLT_MAX (~7.5e-37) also
    gets CB 0, as in bitsandbytes (127/SCB overflows): an absolute error below 7.5e-37. With
    `scale_from="float16"` a weight with a value float16 cannot hold (|w| >= 65520, which casts to
    inf) raises QuantizationError, where bitsandbytes would store an infinite scale; `name` only
    labels errors. Rows are quantized `chunk_elements` at a time by `quantize_int8_rows`.

    >>> CB, SCB = quantize_int8(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    >>> CB.tolist(), SCB.tolist()
    ([[64, -127, 32], [0, 0, 0]], [2.0, 0.0])

    `method="search"` stores the same layout with each row's SCB chosen for the least squared error
    (`searched_row_scales`), the weights beyond it clipped to ±127.
    """
    check_int8_weight(weight, scale_from, name)
    if method not in ("rtn", "search"):
        raise QuantizationError(name, f"int8 method {method!r} is not a weight-only one",
                                "Use rtn or search here; gptq runs through the converter with calibration text.")
    CB = torch.empty(weight.shape, dtype=torch.int8)
    SCB = torch.empty(weight.shape[0], dtype=torch.float32)
    for _ in _quantized_row_blocks(weight, scale_from, name, chunk_elements, SCB, lambda start, end: CB[start:end],
                                   search=method == "search"):
        pass
    return CB, SCB


def _quantized_row_blocks(weight: torch.Tensor, scale_from: str, name: str, chunk_elements: int, SCB: torch.Tensor,
                          codes_for: Callable[[int, int], torch.Tensor], report: ReadReport = NO_REPORT,
                          search: bool = False):
    """Quantize `weight` about `chunk_elements` at a time, in whole rows: rows [start, end) go to
    `codes_for(start, end)` and SCB[start:end]; yields that block of codes when it is filled.
    `search`: each row's scale is `searched_row_scales`', not its absmax."""
    rows, cols = weight.shape
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        end = min(start + step, rows)
        codes = codes_for(start, end)
        report.reading(start * cols, end * cols)
        quantize_int8_rows(weight[start:end], codes, SCB[start:end], scale_from, name=name)
        if search:
            w = weight[start:end].to(torch.float16 if scale_from == "float16" else torch.float32).float()
            SCB[start:end] = searched_row_scales(w, SCB[start:end])
            codes.copy_(int8_codes(w, SCB[start:end]))
        report.done(start * cols, end * cols)
        yield codes


# Candidate row scales of the search, as fractions of the row absmax (below it the largest
# weights clip to ±127 and the others are resolved more finely).
INT8_SEARCH_FACTORS = tuple(0.80 + 0.0125 * i for i in range(16))


def searched_row_scales(rows: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Per row of `rows` (fp32 (r, in)), the SCB among `absmax` × (1, INT8_SEARCH_FACTORS) whose
    codes `int8_codes` reconstruct the row with the least squared error.

    >>> rows = torch.randn(4, 256)
    >>> absmax = rows.abs().amax(1)
    >>> bool((_row_errors(rows, searched_row_scales(rows, absmax)) <= _row_errors(rows, absmax)).all())
    True
    """
    best_scale, best_error = absmax, _row_errors(rows, absmax)
    for factor in INT8_SEARCH_FACTORS:
        scale = absmax * factor
        error = _row_errors(rows, scale)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


def int8_codes(rows: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """round(w · 127 / SCB), clipped to ±127 (int8 (r, in)); a zero SCB gives 0."""
    multiplier = torch.where(SCB > 0, 127.0 / SCB, 0.0)
    return torch.mul(rows, multiplier.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)


class Int8Grid:
    """GPTQ's grid (bloomconv.storage.gptq) for an int8 weight (out, in): every row's SCB fixed up
    front (searched, on the fp16 cast as the preset takes it), columns rounded to ±127 steps of it.
    `stored()` is what `Int8Storage.encode` returns, in the same layout."""

    group_size = None

    def __init__(self, weight: torch.Tensor, settings: QuantSettings, *, name: str = "weight"):
        check_int8_weight(weight.cpu(), settings.int8_scale_from, name)
        rows = weight.to(torch.float16 if settings.int8_scale_from == "float16" else torch.float32).float()
        absmax = rows.abs().amax(dim=1)
        if not torch.isfinite(absmax).all():
            raise _non_finite_int8(name, weight.cpu(), settings.int8_scale_from)
        self.SCB = searched_row_scales(rows, absmax)                                    # (out,)
        self.CB = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)     # (out, in)

    def round(self, column: int, weights: torch.Tensor) -> torch.Tensor:
        self.CB[:, column] = int8_codes(weights[:, None], self.SCB)[:, 0]
        return self.CB[:, column] * self.SCB * _INT8_DEQUANT_SCALE

    def stored(self) -> dict[str, torch.Tensor]:
        return {"weight": self.CB.cpu(), INT8_SCALE_SUFFIX: self.SCB.cpu()}


def _row_errors(rows: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    return (rows - int8_codes(rows, SCB) * (SCB * _INT8_DEQUANT_SCALE).unsqueeze(-1)).square_().sum(dim=1)


def check_int8_weight(weight: torch.Tensor, scale_from: str, name: str) -> None:
    """A typed error unless `weight` is a 2-D float matrix and `scale_from` is known."""
    check_float_weight(weight, name)
    if weight.dim() != 2:
        raise QuantizationError(name, f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}",
                                "Quantize only Linear weights to int8.")
    if scale_from not in INT8_SCALE_FROM:
        raise QuantizationError(name, f"unknown int8 scale_from {scale_from!r}",
                                f"Use one of {', '.join(INT8_SCALE_FROM)}.")


def quantize_int8_rows(rows: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, scale_from: str, *,
                       name: str = "weight") -> None:
    """`quantize_int8` of a block of rows into preallocated CB (r, in) int8 and SCB (r,) fp32: the
    compiled quantizer where the kernels were built, else torch (the reference, bit for bit the same).
    Raises QuantizationError for a non-finite row (or one float16 cannot hold)."""
    compiled = _compiled_int8_quantizer()
    if compiled is not None and CB.is_contiguous() and SCB.is_contiguous():
        compiled(rows, CB, SCB, to_fp16=scale_from == "float16")
        absmax = SCB
    else:
        w = rows.to(torch.float16) if scale_from == "float16" else rows     # (r, in)
        absmax = torch.amax(w.abs(), dim=1).float()                         # (r,)
        if torch.isfinite(absmax).all():
            # `127.0 / absmax` is reciprocal-then-multiply, as in bitsandbytes; zero rows stay 0, not NaN
            multiplier = torch.where(absmax > 0, 127.0 / absmax, 0.0)
            CB.copy_(torch.mul(w, multiplier.unsqueeze(-1)).round_())     # (r, in) fp32; one temporary
            SCB.copy_(absmax)
    if not torch.isfinite(absmax).all():
        raise _non_finite_int8(name, rows, scale_from)


def _compiled_int8_quantizer():
    """The C quantizer (bit for bit the torch code of `quantize_int8_rows`), or None where the
    kernels were not built."""
    return int8_kernel.int8_quantize_rows if kernels.available() else None


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`CB * SCB / 127` computed in fp32 (as bitsandbytes does), then cast to `dtype`.

    >>> dequantize_int8(torch.tensor([[64, -127]], dtype=torch.int8), torch.tensor([2.0]))
    tensor([[ 1.0079, -2.0000]])
    """
    rows, cols = CB.shape
    out = torch.empty((rows, cols), dtype=dtype, device=CB.device)
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        rows_SCB = SCB[start:start + step].view(-1, 1)
        out[start:start + step] = CB[start:start + step] * rows_SCB * _INT8_DEQUANT_SCALE  # same order as bnb
    return out


def _non_finite_int8(name: str, rows: torch.Tensor, scale_from: str) -> QuantizationError:
    if scale_from == "float16" and torch.isfinite(rows).all():
        peak = rows.abs().max().item()
        return QuantizationError(
            name, f"holds a value of magnitude {peak:g}, beyond float16's range, so int8 quantization of "
            "its float16 cast (what transformers does) would store an infinite scale",
            "Quantize with int8_scale_from='source' (scales taken in the weight's own dtype), or use nf4/fp4.")
    return QuantizationError(name, "holds NaN or infinite values", "The checkpoint is damaged; get it again.")


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    CB: torch.Tensor   # (out, in) int8
    SCB: torch.Tensor  # (out,) fp32: the row absmax itself, so a row's scale is SCB / 127

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.CB.shape)

    def uses_int8pack(self, x: torch.Tensor) -> bool:
        """torch's fused int8 GEMM: bf16 compute where the compiled kernels are not installed."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm")
                and self.CB.shape[1] % _INT8PACK_ALIGN == 0)

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        if products not in (None, x.dtype):
            return products_in(products, x, self.matmul,
                               lambda x, dtype: dense_on_tiles(x, dtype, self.CB, lambda: self.kernel_matrix))
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[:-1].numel() > dense.SMALL_BATCH_ROWS:
            return self._bf16_products(x)
        if dense_kernel_takes(x, self.CB):
            # int8 widened in registers, fp32 sums, each row's sum scaled by SCB / 127
            return self.kernel_matrix.matmul(x).to(x.dtype)
        if not self.uses_int8pack(x):  # also on accelerators: exact, dequantized on the device in pieces
            return linear_in_pieces(x, self.CB.shape,
                                     lambda start, end: dequantize_int8(self.CB[start:end], self.SCB[start:end],
                                                                        x.dtype))
        # bf16 compute without the kernels: torch's fused kernel multiplies int8 weights by bf16
        # activations without widening the matrix.
        CB = self.CB
        if CB.data_ptr() % _INT8PACK_ALIGN:
            CB = CB.clone()  # safetensors only aligns data to 8 bytes; torch allocates 64-aligned
        scales = (self.SCB / 127).to(torch.bfloat16)                            # (out,)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()       # (B*T, in)
        out = torch._weight_int8pack_mm(flat, CB, scales)                       # (B*T, out)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.CB.shape[0])

    def _bf16_products(self, x: torch.Tensor) -> torch.Tensor:
        """Many bf16 rows (a prefill): torch's bf16 GEMM on the codes, which bf16 holds exactly, a
        tile of `fourbit.tile_rows` rows at a time; each row's sum, rounded to bf16 by the GEMM,
        is scaled by SCB / 127 in fp32 and rounded to bf16 again. Memory: the bf16 result and one
        tile's temporaries."""
        rows, cols = self.CB.shape
        flat = x.reshape(-1, cols)
        out = torch.empty(flat.shape[0], rows, dtype=x.dtype)                  # (B*T, out)
        step = fourbit.tile_rows(cols, torch.bfloat16.itemsize)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            sums = F.linear(flat, self.CB[start:end].to(torch.bfloat16))       # (B*T, tile)
            out[:, start:end] = sums.float().mul_(self.row_scale[start:end])
        return out.reshape(*x.shape[:-1], rows)

    @functools.cached_property
    def row_scale(self) -> torch.Tensor:
        """SCB / 127 (fp32): what each row's integer sum is multiplied by."""
        return self.SCB * (1 / 127)

    @functools.cached_property
    def kernel_matrix(self) -> dense.DenseMatrix:
        """The codes and row scales as the dense kernel reads them, checked once."""
        return dense.DenseMatrix(self.CB, self.row_scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.CB, self.SCB, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize_int8(self.CB[flat], self.SCB[flat], dtype).reshape(*ids.shape, -1)

    @property
    def row_multiple(self) -> int:
        return slice_granularity(*self.shape)

    def row_slice(self, start: int, end: int) -> "Int8Weight":
        return Int8Weight(self.CB[start:end], self.SCB[start:end])


@register
class Int8Storage(Storage):
    quant_type = QuantType.INT8

    @classmethod
    def stored_names(cls, settings=None) -> tuple[str, ...]:
        return ("weight", INT8_SCALE_SUFFIX)

    @classmethod
    def stored_bytes(cls, shape, source_itemsize, settings=None) -> int:
        rows, cols = shape
        return rows * cols + rows * 4                     # int8 weight + fp32 SCB per row

    @classmethod
    def encode(cls, weight, settings=None, *, name="weight"):
        settings = settings or QuantSettings(cls.quant_type)
        CB, SCB = quantize_int8(weight, settings.int8_scale_from, method=settings.weight_only_method, name=name)
        return {"weight": CB, INT8_SCALE_SUFFIX: SCB}

    @classmethod
    def encode_stream(cls, weight, settings=None, *, name="weight", report=NO_REPORT):
        settings = settings or QuantSettings(cls.quant_type)
        check_int8_weight(weight, settings.int8_scale_from, name)
        rows, cols = weight.shape
        SCB = torch.empty(rows, dtype=torch.float32)   # (out,): filled as the codes are written
        step = max(1, STREAM_PIECE_ELEMENTS // max(cols, 1))
        codes_written = []

        def codes():
            buffer = torch.empty((min(step, rows), cols), dtype=torch.int8)  # (step, in), refilled per piece
            for block in _quantized_row_blocks(weight, settings.int8_scale_from, name, STREAM_PIECE_ELEMENTS, SCB,
                                               lambda start, end: buffer[:end - start], report,
                                               search=settings.weight_only_method == "search"):
                yield tensor_bytes(block)
            codes_written.append(True)

        def scales():
            if not codes_written:
                raise RuntimeError(f"{name}: SCB taken before the int8 codes it scales were written")
            yield tensor_bytes(SCB)
        return {"weight": StreamedTensor(torch.int8, (rows, cols), codes),
                INT8_SCALE_SUFFIX: StreamedTensor(torch.float32, (rows,), scales)}

    @classmethod
    def gptq_grid(cls, weight: torch.Tensor, settings: QuantSettings, *, name: str = "weight") -> Int8Grid:
        """The grid GPTQ rounds `weight` (out, in) onto (bloomconv.storage.gptq)."""
        return Int8Grid(weight, settings, name=name)

    @classmethod
    def decode(cls, lookup: Lookup, *, name="weight") -> Int8Weight:
        CB, SCB = cls.require(lookup, "weight", name), cls.require(lookup, INT8_SCALE_SUFFIX, name)
        if CB.dtype != torch.int8 or CB.dim() != 2 or SCB.dtype != torch.float32 or SCB.shape != CB.shape[:1]:
            raise QuantizationError(name, f"int8 weight {CB.dtype} {tuple(CB.shape)} with SCB {SCB.dtype} "
                                    f"{tuple(SCB.shape)} is not LLM.int8()'s layout",
                                    "The file is damaged or was not written by bloomconv; convert again.")
        return Int8Weight(CB, SCB)
