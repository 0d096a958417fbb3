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

import torch

from bloomconv.errors import QuantizationError

from . import _isa_code, _kernels, kernel_threads

__all__ = ["SMALL_BATCH_ROWS", "dense_matmul", "supports"]

# Above this many activation rows, a weight already in the compute dtype (bf16 x bf16) goes to
# torch's GEMM, which overtakes the kernel once the multiply, not reading the weight, is the cost;
# so do int8 weights times bf16 rows (their codes are exact in bf16: `Int8Weight`). Weights that
# torch would have to widen first for fp32 x (int8, bf16) take the kernel: it was faster than
# widening first at every batch size measured.
SMALL_BATCH_ROWS = 64

_KINDS = {torch.int8: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/dense.c's KIND_*


def supports(weight: torch.Tensor) -> bool:
    """Whether `dense_matmul` takes this weight: a 2-D int8/bf16/fp16 matrix in CPU memory."""
    return weight.dtype in _KINDS and weight.dim() == 2 and weight.device.type == "cpu"


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, *,
                 isa: str | None = None) -> torch.Tensor:
    """x (..., in) of any float dtype @ weight (out, in).T [* scale (out,)] -> (..., out) fp32.

    `weight` is int8, bf16 or fp16 (memory-mapped is fine; a non-contiguous one is copied). Uses
    `kernel_threads()` threads; `isa` forces an instruction set from `bloomconv.kernels.isas()`.
    """
    code = _isa_code(isa)
    rows, cols = weight.shape if weight.dim() == 2 else (-1, -1)
    if not supports(weight) or x.shape[-1] != cols:
        raise QuantizationError("weight", f"cannot multiply x of shape {tuple(x.shape)} by a {weight.dtype} weight "
                                f"of shape {tuple(weight.shape)} on {weight.device}",
                                "Pass a 2-D int8/bf16/fp16 CPU weight whose rows match x's last dimension.")
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != rows):
        raise QuantizationError("weight", f"scale must be {rows} fp32 values, got {scale.dtype} × {scale.numel()}",
                                "Pass one fp32 scale per weight row (SCB / 127 for LLM.int8()).")
    batch = x.shape[:-1].numel()
    flat = x.reshape(batch, cols).to(device="cpu", dtype=torch.float32).contiguous()      # (M, in)
    weight = weight.contiguous()
    scale = None if scale is None else scale.contiguous()
    out = torch.empty(flat.shape[0], rows, dtype=torch.float32)                          # (M, out)
    if out.numel():
        _kernels.dense_matmul(flat.data_ptr(), flat.shape[0], out.data_ptr(), kernel_threads(), code,
                              weight.data_ptr(), rows, cols, _KINDS[weight.dtype],
                              0 if scale is None else scale.data_ptr())
    return out.reshape(*x.shape[:-1], rows)
