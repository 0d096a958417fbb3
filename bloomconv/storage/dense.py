"""Plain floating-point weights (bf16, fp16, fp32), stored as they are: `<module>.weight`.

Products go through the dense kernel (bloomconv/kernels/csrc/dense.c), which widens 16-bit weights
to fp32 in registers, for the few activation rows of a decoding step or whenever torch would
have to widen the weight first; a bf16 weight times many bf16 rows goes to torch's bf16 GEMM.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from bloomconv.format import QuantType
from bloomconv.kernels import dense

from .base import NO_REPORT, Lookup, Storage, register, slice_granularity, stream_as_stored
from .fallback import dense_kernel_takes, dense_on_tiles, linear_in_pieces, products_in

__all__ = ["DenseStorage", "DenseWeight"]


@dataclasses.dataclass(frozen=True)
class DenseWeight:
    weight: torch.Tensor  # (out, in)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        if products not in (None, x.dtype):
            return products_in(products, x, self.matmul,
                               lambda x, dtype: dense_on_tiles(x, dtype, self.weight, lambda: self.kernel_matrix))
        w = self.weight
        if dense_kernel_takes(x, w) and (w.dtype != x.dtype or x.shape[:-1].numel() <= dense.SMALL_BATCH_ROWS):
            return self.kernel_matrix.matmul(x).to(x.dtype)  # fp32 products and sums
        if w.dtype == x.dtype:
            return F.linear(x, w)
        return linear_in_pieces(x, w.shape, lambda start, end: w[start:end].to(x.dtype))

    @functools.cached_property
    def kernel_matrix(self) -> dense.DenseMatrix:
        """The weight as the dense kernel reads it, checked once."""
        return dense.DenseMatrix(self.weight)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[ids].to(dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    @property
    def row_multiple(self) -> int:
        return slice_granularity(*self.shape)

    def row_slice(self, start: int, end: int) -> "DenseWeight":
        return DenseWeight(self.weight[start:end])


@register
class DenseStorage(Storage):
    quant_type = QuantType.NONE

    @classmethod
    def stored_names(cls, settings=None) -> tuple[str, ...]:
        return ("weight",)

    @classmethod
    def stored_bytes(cls, shape, source_itemsize, settings=None) -> int:
        numel = 1
        for d in shape:
            numel *= d
        return numel * source_itemsize

    @classmethod
    def encode(cls, weight, settings=None, *, name="weight"):
        return {"weight": weight}

    @classmethod
    def encode_stream(cls, weight, settings=None, *, name="weight", report=NO_REPORT):
        return {"weight": stream_as_stored(weight, report)}

    @classmethod
    def decode(cls, lookup: Lookup, *, name="weight") -> DenseWeight:
        return DenseWeight(cls.require(lookup, "weight", name))
