"""Multiplying by a stored weight, whatever its storage: `linear(x, weight, bias)`.

A weight record wraps the memory-mapped tensors of one matrix exactly as the file stores them:

    DenseWeight    (out, in) in the stored float dtype
    Int8Weight     bitsandbytes LLM.int8(): `CB` int8 (out, in) + `SCB` fp32 row absmax (out,)
    FourBitWeight  bitsandbytes nf4/fp4: packed uint8 + its quant state (absmax, quant_map, …)

Each record knows how to multiply an activation by itself (`matmul`) and how to read whole rows
(`rows`, the embedding lookup), so the model code never branches on storage. Nothing here keeps a
full-precision copy of a quantized matrix beyond the one being multiplied. Products go through
bloomconv's compiled kernels, which read each weight as stored: runtime/kernels/dense.c for
int8/bf16/fp16, fourbit.c for nf4/fp4 (decoding steps; larger batches multiply dequantized tiles).
A bf16 weight times many bf16 rows goes to torch's bf16 GEMM. Without a C compiler at install
time: torch, on weights widened CONVERT_CHUNK_BYTES at a time (int8 in bf16 compute: torch's
fused int8 GEMM).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from bloomconv.format import INT8_SCALE_SUFFIX, QUANT_STATE_SUFFIX_TEMPLATE, QuantType
from bloomconv.quant import FourBitState, dequantize_4bit, dequantize_int8

from . import kernels
from .kernels import dense

__all__ = ["CONVERT_CHUNK_BYTES", "DenseWeight", "FourBitWeight", "Int8Weight", "WeightRecord", "linear",
           "weight_record"]

# Largest piece of a weight converted to the compute dtype at once (bf16 storage, fp32 compute):
# bounds anonymous memory whatever the matrix size (the tied lm_head is vocab × hidden).
CONVERT_CHUNK_BYTES = 64 * 1024 * 1024
# torch._weight_int8pack_mm (torch 2.13, CPU) needs rows of a multiple of 16 bytes and a weight
# starting on a 16-byte boundary: otherwise it returns garbage or segfaults. Measured, not documented.
_INT8PACK_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class DenseWeight:
    weight: torch.Tensor  # (out, in)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _dense_kernel_takes(x, w) and (w.dtype != x.dtype or _rows(x) <= dense.SMALL_BATCH_ROWS):
            # reads the bf16/fp16 weight once, widening in registers; fp32 products and sums
            return dense.dense_matmul(x, w).to(x.dtype)
        if w.dtype == x.dtype:
            return F.linear(x, w)
        return _linear_in_pieces(x, w.shape, lambda start, end: w[start:end].to(x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[ids].to(dtype)


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    CB: torch.Tensor   # (out, in) int8
    SCB: torch.Tensor  # (out,) fp32: the row absmax itself, so a row's scale is SCB / 127

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.CB.shape)

    def uses_int8pack(self, x: torch.Tensor) -> bool:
        """torch's fused int8 GEMM, for large batches computed in bf16 anyway."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm")
                and self.CB.shape[1] % _INT8PACK_ALIGN == 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if _dense_kernel_takes(x, self.CB):
            # int8 widened in registers, fp32 sums, each row's sum scaled by SCB / 127
            return dense.dense_matmul(x, self.CB, self.row_scale).to(x.dtype)
        if not self.uses_int8pack(x):  # also on accelerators: exact, dequantized on the device in pieces
            return _linear_in_pieces(x, self.CB.shape,
                                     lambda start, end: dequantize_int8(self.CB[start:end], self.SCB[start:end],
                                                                        x.dtype))
        # Prefill in bf16: torch's fused kernel multiplies int8 weights by bf16 activations
        # without widening the matrix.
        CB = self.CB
        if CB.data_ptr() % _INT8PACK_ALIGN:
            CB = CB.clone()  # safetensors only aligns data to 8 bytes; torch allocates 64-aligned
        scales = (self.SCB / 127).to(torch.bfloat16)                            # (out,)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()       # (B*T, in)
        out = torch._weight_int8pack_mm(flat, CB, scales)                       # (B*T, out)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.CB.shape[0])

    @functools.cached_property
    def row_scale(self) -> torch.Tensor:
        """SCB / 127 (fp32): what each row's integer sum is multiplied by."""
        return self.SCB * (1 / 127)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.CB, self.SCB, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize_int8(self.CB[flat], self.SCB[flat], dtype).reshape(*ids.shape, -1)


@dataclasses.dataclass(frozen=True)
class FourBitWeight:
    stored: dict[str, torch.Tensor]  # `weight` (packed uint8), `weight.absmax`, …, as bitsandbytes names them
    shape: tuple[int, int]           # (out, in) of the matrix it encodes

    @functools.cached_property
    def matrix(self) -> kernels.FourBitMatrix:
        """The stored tensors as the fused kernels read them (views, no copy)."""
        return kernels.FourBitMatrix.from_stored(self.stored)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        return kernels.available() and x.device.type == "cpu" and self.stored["weight"].device.type == "cpu"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fused_kernel(x):
            # Decodes the packed bytes as it multiplies: reads the matrix once, at several GB/s, where
            # dequantize-then-F.linear ran at ~0.2 GB/s (runtime/kernels/__init__.py).
            return kernels.fourbit_matmul(x, self.matrix).to(x.dtype)
        if x.device.type != "cpu":
            return self.bitsandbytes_matmul(x)
        return F.linear(x, self.dequantize(x.dtype))

    def bitsandbytes_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through `bitsandbytes.matmul_4bit`, on whatever device the tensors are (on CUDA its
        fused 4-bit GEMV for a decoding step; elsewhere it dequantizes first). Imported only here:
        the CPU runtime never loads bitsandbytes."""
        import bitsandbytes
        from bitsandbytes.functional import QuantState
        state = QuantState.from_dict({k.removeprefix("weight."): v for k, v in self.stored.items() if k != "weight"},
                                     device=self.stored["weight"].device)
        return bitsandbytes.matmul_4bit(x, self.stored["weight"].t(), quant_state=state)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.stored["weight"].device.type == "cpu" and kernels.available():
            return kernels.fourbit_dequantize(self.matrix).to(dtype)
        return dequantize_4bit(self.stored).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.stored["weight"].device.type == "cpu" and kernels.available():
            return kernels.fourbit_dequantize(self.matrix, ids).to(dtype).reshape(*ids.shape, self.shape[1])
        return self.dequantize(dtype)[ids]


WeightRecord = DenseWeight | Int8Weight | FourBitWeight


def _dense_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the dense kernel can compute this product (built, on the CPU, an int8/16-bit weight)."""
    return dense.available() and x.device.type == "cpu" and dense.supports(weight)


def _rows(x: torch.Tensor) -> int:
    return x.shape[:-1].numel()


def _linear_in_pieces(x: torch.Tensor, shape: tuple[int, int], piece) -> torch.Tensor:
    """F.linear against a weight widened CONVERT_CHUNK_BYTES at a time: `piece(start, end)` gives
    rows [start, end) in x's dtype. Bounds the memory a vocab × hidden matrix would take."""
    out_features, in_features = shape
    rows = max(1, CONVERT_CHUNK_BYTES // (in_features * x.element_size()))
    return torch.cat([F.linear(x, piece(start, min(start + rows, out_features)))
                      for start in range(0, out_features, rows)], dim=-1)


def linear(x: torch.Tensor, weight: WeightRecord, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), for any weight storage. x: (..., in) -> (..., out)."""
    out = weight.matmul(x)  # a new tensor on every path: the bias can be added in place
    return out if bias is None else out.add_(bias.to(out.dtype))


class TensorSource(Protocol):
    def get(self, name: str) -> torch.Tensor | None: ...
    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]: ...


def weight_record(module: str, source: TensorSource) -> WeightRecord:
    """The record for the stored matrix `<module>.weight`, recognised by the tensors next to it."""
    weight = source.get(f"{module}.weight")
    scale = source.get(f"{module}.{INT8_SCALE_SUFFIX}")
    if scale is not None:
        return Int8Weight(weight, scale)
    for quant_type in (QuantType.NF4, QuantType.FP4):
        blob = source.get(f"{module}.weight.{QUANT_STATE_SUFFIX_TEMPLATE.format(quant_type=quant_type.value)}")
        if blob is not None:
            stored = {"weight": weight, **{f"weight.{k}": v for k, v in source.with_prefix(f"{module}.weight.").items()}}
            return FourBitWeight(stored, FourBitState.from_blob(blob).shape)
    return DenseWeight(weight)
