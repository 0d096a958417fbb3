"""Matrix-vector products straight from stored int8 (LLM.int8() `CB` + row scale), bf16 and fp16
weights, in fp32, for the few activation rows of a decoding step.

`dense_matmul(x, weight, scale)` computes `x @ weight.T * scale` widening each weight to fp32 in
registers (csrc/dense.c, in the `_kernels` extension): the matrix is read once, as stored. The
alternatives were slower or less exact: fp32 activations against bf16 weights need a converted copy
of the weight first, `F.linear` in bf16 rounds the activations and the result to bf16, and
`torch._weight_int8pack_mm` multiplies in bf16 (about 1e-2 relative error on BLOOM's logits,
against 1e-6 here). With many activation rows the kernel is compute-bound; it still beats widening
first, but not torch's bf16 GEMM on bf16 x bf16 (see SMALL_BATCH_ROWS).

Where the extension did not build (no C compiler at install time) `bloomconv.kernels.available()`
is False and callers multiply with torch instead.

>>> weight = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
>>> dense_matmul(torch.randn(1, 32), weight, torch.full((64,), 0.01)).shape  # doctest: +SKIP
torch.Size([1, 64])
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from bloomconv.errors import QuantizationError

from . import BF16_TILE_ROWS, TILE_BATCH_ROWS, _isa_code, _kernels, bf16_tiles, kernel_threads

__all__ = ["SMALL_BATCH_ROWS", "DenseMatrix", "dense_matmul", "supports"]

# Above this many activation rows, a weight already in the compute dtype (bf16 x bf16) goes to
# torch's GEMM, which overtakes the kernel once the multiply, not reading the weight, is the cost;
# so do int8 weights times bf16 rows (their codes are exact in bf16: `Int8Weight`). Weights that
# torch would have to widen first for fp32 x (int8, bf16) take the kernel: it was faster than
# widening first at every batch size measured.
SMALL_BATCH_ROWS = 64

_KINDS = {torch.int8: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/dense.c's KIND_*


def supports(weight: torch.Tensor) -> bool:
    """Whether `dense_matmul` takes this weight: a 2-D int8/bf16/fp16 matrix in CPU memory."""
    return weight.dtype in _KINDS and weight.dim() == 2 and weight.is_cpu


@dataclasses.dataclass(frozen=True)
class DenseMatrix:
    """One int8/bf16/fp16 matrix (out, in), with its int8 row scales, as the kernel reads it.

    Checked once, on construction (a non-contiguous weight is copied), so that a product checks
    only x: a decoding step multiplies each matrix once per token, and per-call checks of the
    weight were a measurable part of a step. Storage records keep one per weight.
    """

    weight: torch.Tensor                # (out, in) int8, bf16 or fp16, CPU
    scale: torch.Tensor | None = None   # (out,) fp32: each row's sum is multiplied by it

    def __post_init__(self):
        rows, cols = self.weight.shape if self.weight.dim() == 2 else (-1, -1)
        if not supports(self.weight):
            raise QuantizationError("weight", f"cannot multiply by a {self.weight.dtype} weight of shape "
                                    f"{tuple(self.weight.shape)} on {self.weight.device}",
                                    "Pass a 2-D int8/bf16/fp16 CPU weight.")
        if self.scale is not None and (self.scale.dtype != torch.float32 or self.scale.numel() != rows):
            raise QuantizationError("weight", f"scale must be {rows} fp32 values, got {self.scale.dtype} × "
                                    f"{self.scale.numel()}", "Pass one fp32 scale per weight row (SCB / 127 for "
                                    "LLM.int8()).")
        object.__setattr__(self, "weight", self.weight.contiguous())
        if self.scale is not None:
            object.__setattr__(self, "scale", self.scale.contiguous())

    @functools.cached_property
    def _arguments(self) -> tuple:
        """csrc/dense.c's matrix arguments: weight, rows, cols, kind, scale."""
        return (self.weight.data_ptr(), *self.weight.shape, _KINDS[self.weight.dtype],
                0 if self.scale is None else self.scale.data_ptr())

    def matmul(self, x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
        """x (..., in) of any float dtype @ weight.T [* scale] -> (..., out) fp32, with
        `kernel_threads()` threads; `isa` forces an instruction set from `bloomconv.kernels.isas()`.
        bf16 x of BF16_TILE_ROWS to TILE_BATCH_ROWS rows times int8 or bf16 weights multiplies in
        bf16 products on AMX tiles where the CPU has them (`multiplies_on_tiles`; fp32 sums)."""
        code = _isa_code(isa)
        _, rows, cols = self._arguments[:3]
        if x.shape[-1] != cols:
            raise QuantizationError("weight", f"cannot multiply x of shape {tuple(x.shape)} by a {self.weight.dtype} "
                                    f"weight of shape {tuple(self.weight.shape)}",
                                    f"Pass activations whose last dimension is {cols}.")
        tiles = isa is None and x.dtype == torch.bfloat16 and self.multiplies_on_tiles(x.shape[:-1].numel())
        if x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous():
            x = x.to(device="cpu", dtype=torch.float32).contiguous()                     # (..., in)
        out = torch.empty(x.shape[:-1] + (rows,), dtype=torch.float32)                    # (..., out)
        if out.numel():
            multiply = _kernels.dense_matmul_bf16_tiles if tiles else _kernels.dense_matmul
            multiply(x.data_ptr(), out.numel() // rows, out.data_ptr(), kernel_threads(), code, *self._arguments)
        return out

    def multiplies_on_tiles(self, batch: int) -> bool:
        """Whether `batch` rows of bf16 x go to the AMX kernel (bf16 products: `matmul`)."""
        return (BF16_TILE_ROWS <= batch <= TILE_BATCH_ROWS and self.weight.dtype in (torch.int8, torch.bfloat16)
                and self.weight.shape[1] % 32 == 0 and bf16_tiles())


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, *,
                 isa: str | None = None) -> torch.Tensor:
    """x (..., in) of any float dtype @ weight (out, in).T [* scale (out,)] -> (..., out) fp32.

    `weight` is int8, bf16 or fp16 (memory-mapped is fine; a non-contiguous one is copied). Uses
    `kernel_threads()` threads; `isa` forces an instruction set from `bloomconv.kernels.isas()`.
    For a matrix multiplied again and again, keep its `DenseMatrix`.
    """
    return DenseMatrix(weight, scale).matmul(x, isa=isa)
