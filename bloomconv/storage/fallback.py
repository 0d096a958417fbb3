"""Products the compiled kernels do not take, computed by torch within bounded memory."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bloomconv import kernels
from bloomconv.kernels import dense

from .base import ROW_MULTIPLE

__all__ = ["CONVERT_CHUNK_BYTES", "dense_kernel_takes", "dense_on_tiles", "linear_in_pieces", "products_in"]

# Largest piece of a weight converted to the compute dtype at once (bf16 storage, fp32 compute):
# bounds anonymous memory whatever the matrix size (the tied lm_head is vocab × hidden).
CONVERT_CHUNK_BYTES = 64 * 1024 * 1024


def products_in(dtype: torch.dtype, x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor],
                on_kernels: Callable[[torch.Tensor, torch.dtype], torch.Tensor | None]) -> torch.Tensor:
    """A record's product of x with its products in `dtype`, the result in x's dtype.

    `on_kernels(x, dtype)` is the kernels' product where they take it, else None: bf16 x (x
    rounded) on AMX tiles, or for torch.int8, x as it is rounded to int8 inside the 4-bit kernel
    (int8 activations); fp32 sums, returned as they are. Otherwise the record's own product: of x
    rounded to a float `dtype` (torch's GEMM in that dtype for many rows), widened; int8
    activations only the 4-bit kernel takes, so other records multiply x as it is."""
    if dtype == torch.int8:
        product = on_kernels(x, dtype)
        return matmul(x) if product is None else product.to(x.dtype)
    rounded = x.to(dtype)
    product = on_kernels(rounded, dtype)
    return (product if product is not None else matmul(rounded)).to(x.dtype)


def dense_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the dense kernel can compute this product (built, on the CPU, an int8/16-bit weight)."""
    return kernels.available() and x.is_cpu and dense.supports(weight)


def dense_on_tiles(x: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor,
                   matrix: Callable[[], dense.DenseMatrix]) -> torch.Tensor | None:
    """`products_in`'s `on_kernels` for a record the dense kernel multiplies (`weight`, its stored
    matrix; `matrix()`, the record's DenseMatrix): the AMX product of bf16 x, or None."""
    if (dtype == torch.bfloat16 and dense_kernel_takes(x, weight)
            and matrix().multiplies_on_tiles(x.shape[:-1].numel())):
        return matrix().matmul(x)
    return None


def linear_in_pieces(x: torch.Tensor, shape: tuple[int, int], piece: Callable[[int, int], torch.Tensor],
                     multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """F.linear against a weight widened CONVERT_CHUNK_BYTES at a time: `piece(start, end)` gives
    rows [start, end) in x's dtype. Bounds the memory a vocab × hidden matrix would take. Pieces
    start at multiples of `multiple` rows (of ROW_MULTIPLE), so a row slice of the weight gives
    the same sums."""
    out_features, in_features = shape
    rows = max(1, CONVERT_CHUNK_BYTES // (in_features * x.element_size() * multiple)) * multiple
    return torch.cat([F.linear(x, piece(start, min(start + rows, out_features)))
                      for start in range(0, out_features, rows)], dim=-1)
