"""Matrix-vector products straight from stored int8 (LLM.int8() `CB` + row scale), bf16 and fp16
weights, in fp32, for the few activation rows of a decoding step.

`dense_matmul(x, weight, scale)` computes `x @ weight.T * scale` widening each weight to fp32 in
registers (dense.c): the matrix is read once, as stored. The alternatives measured here were
slower or less exact: fp32 activations against bf16 weights need a converted copy of the weight
first (`DenseWeight` did this in 64 MB pieces), `F.linear` in bf16 rounds the activations and the
result to bf16, and `torch._weight_int8pack_mm` multiplies in bf16 (about 1e-2 relative error on
BLOOM's logits, against 1e-6 here). With many activation rows the kernel is compute-bound; it
still beat widening first, but not torch's bf16 GEMM on bf16 x bf16 (see SMALL_BATCH_ROWS).

Where the extension did not build (no C compiler at install time) `available()` is False and the
weight records fall back to torch.
"""
from __future__ import annotations

import torch

from bloomconv.errors import QuantizationError

from . import isa_code, kernel_threads

try:
    from . import _dense
except ImportError:  # installed without a C compiler
    _dense = None

__all__ = ["SMALL_BATCH_ROWS", "available", "dense_matmul", "isas"]

# Above this many activation rows, a weight already in the compute dtype (bf16 x bf16) goes to
# torch's GEMM: 4096 x 1024 bf16 here, the kernel vs F.linear took 1.6 vs 8.0 ms at 16 rows, 5.3
# vs 16 ms at 64 rows and 34 vs 20 ms at 512. Weights that torch would have to widen or
# dequantize first (int8; bf16 for fp32 compute) always take the kernel: it was faster at every
# batch size measured (512 rows: 36 ms vs 84 ms to dequantize then F.linear in fp32).
SMALL_BATCH_ROWS = 64

_KINDS = {torch.int8: 0, torch.bfloat16: 1, torch.float16: 2}  # dense.c's KIND_*
_ISA_CODES = {None: 0, "scalar": 1, "avx2": 2, "avx512": 3}   # dense.c's ISA_*


def available() -> bool:
    """Whether the compiled kernel is installed (its portable C path runs on any CPU)."""
    return _dense is not None


def isas() -> tuple[str, ...]:
    """Instruction sets the kernel can use on this CPU, fastest first, e.g. ("avx512", "avx2", "scalar")."""
    return _dense.isas() if _dense is not None else ()


def supports(weight: torch.Tensor) -> bool:
    """Whether `dense_matmul` takes this weight: a 2-D int8/bf16/fp16 matrix in CPU memory."""
    return weight.dtype in _KINDS and weight.dim() == 2 and weight.device.type == "cpu"


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, *,
                 isa: str | None = None) -> torch.Tensor:
    """x (..., in) of any float dtype @ weight (out, in).T [* scale (out,)] -> (..., out) fp32.

    `weight` is int8, bf16 or fp16 (memory-mapped is fine; a non-contiguous one is copied). Uses
    `kernel_threads()` threads; `isa` forces an instruction set from `isas()`.
    """
    code = isa_code(_dense, "dense kernels", "dense.available()", _ISA_CODES, isa)
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
        _dense.matmul(flat.data_ptr(), flat.shape[0], out.data_ptr(), kernel_threads(), code,
                      weight.data_ptr(), rows, cols, _KINDS[weight.dtype], 0 if scale is None else scale.data_ptr())
    return out.reshape(*x.shape[:-1], rows)
