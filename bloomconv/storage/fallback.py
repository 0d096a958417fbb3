"""Products the compiled kernels do not take, computed by torch within bounded memory."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bloomconv import kernels
from bloomconv.kernels import dense

from .base import ROW_MULTIPLE

__all__ = ["CONVERT_CHUNK_BYTES", "dense_kernel_takes", "linear_in_pieces"]

# Largest piece of a weight converted to the compute dtype at once (bf16 storage, fp32 compute):
# bounds anonymous memory whatever the matrix size (the tied lm_head is vocab × hidden).
CONVERT_CHUNK_BYTES = 64 * 1024 * 1024


def dense_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the dense kernel can compute this product (built, on the CPU, an int8/16-bit weight)."""
    return kernels.available() and x.is_cpu and dense.supports(weight)


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
