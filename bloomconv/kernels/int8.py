"""LLM.int8() vector-wise quantization on CPU: `int8_quantize_rows` fills CB (int8) and SCB (fp32
row absmax) for a block of rows, in one compiled pass per row (csrc/int8.c).

Bit for bit what `bloomconv.storage.int8.quantize_int8` computes with torch (its reference path,
and the path where the extension was not built), for bf16, fp16 and fp32 rows, with the scale taken
from the fp16 cast or from the rows as they are. Rows run on `kernel_threads()` threads with
AVX-512, AVX2 or portable C, whichever this CPU runs fastest (or `isa`).

>>> w = torch.randn(4, 64, dtype=torch.bfloat16)
>>> CB, SCB = torch.empty(4, 64, dtype=torch.int8), torch.empty(4)
>>> int8_quantize_rows(w, CB, SCB, to_fp16=True)                   # doctest: +SKIP
"""
from __future__ import annotations

import torch

from bloomconv.errors import QuantizationError

from . import _isa_code, _kernels, kernel_threads

__all__ = ["int8_quantize_rows"]

_SOURCE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/int8.c's SOURCE_*


def int8_quantize_rows(rows: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, *, to_fp16: bool,
                       isa: str | None = None) -> None:
    """Quantize `rows` (r, c) fp32/bf16/fp16 into `CB` (r, c) int8 and `SCB` (r,) fp32, in place.

    With `to_fp16` each value is first rounded to fp16 (the scale transformers stores). A row
    holding NaN or inf (after that rounding) gets SCB NaN and CB 0: the caller checks SCB.
    """
    code = _isa_code(isa)
    if rows.dtype not in _SOURCE_KINDS or rows.dim() != 2:
        raise QuantizationError("weight", f"cannot int8-quantize a {rows.dtype} tensor of shape {tuple(rows.shape)}",
                                "Pass 2-D fp32, bf16 or fp16 rows.")
    count, cols = rows.shape
    for name, tensor, dtype, shape in (("CB", CB, torch.int8, (count, cols)), ("SCB", SCB, torch.float32, (count,))):
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous() \
                or tensor.device.type != "cpu":
            raise QuantizationError("weight", f"{name} is {tensor.dtype} {tuple(tensor.shape)}; rows of shape "
                                    f"{tuple(rows.shape)} need a contiguous {dtype} {shape} on the CPU",
                                    "Preallocate CB and SCB with torch.empty.")
    rows = rows.to("cpu").contiguous()
    if rows.numel():
        _kernels.int8_quantize(rows.data_ptr(), _SOURCE_KINDS[rows.dtype], int(to_fp16), count, cols,
                               CB.data_ptr(), SCB.data_ptr(), kernel_threads(), code)
