"""GPTQ (Frantar et al., ICLR 2023): round a weight's columns in order, each one's rounding error
compensated by the columns not yet rounded, through the Hessian H = 2XXᵀ of the layer's inputs X.

The grid the columns are rounded onto is a storage type's own (`FourBitGrid`, `Int8Grid`), so the
result is stored exactly as round to nearest stores it and loads wherever that loads. A grid
fixes its scales group by group: 4-bit fixes a block's scale when the first column of the block
is reached, from the weights as updated by then (GPTQ's groups, "static groups" off: bitsandbytes'
blocks are consecutive columns of a row); int8 fixes every row's scale up front.

The column loop follows the reference implementation (IST-DASLab/gptq `gptq.py`): dampening by
a fraction of the mean diagonal, the upper Cholesky factor of H⁻¹, and lazy batches whose updates
reach the later columns in one product. Columns are taken in their stored order (no act-order).

>>> w = torch.randn(8, 64)
>>> x = torch.randn(256, 64)
>>> grid = IntegerGrid(w)
>>> gptq_quantize(w, 2 * x.T @ x / 256, grid)
>>> bool(((x @ (grid.q - w).T) ** 2).sum() < ((x @ (w.round() - w).T) ** 2).sum())
True
"""
from __future__ import annotations

from typing import Protocol

import torch

from bloomconv.errors import QuantizationError

__all__ = ["DAMPENING", "LAZY_BATCH", "Grid", "gptq_quantize"]

DAMPENING = 0.01  # added to H's diagonal, times its mean: H stays positive definite
LAZY_BATCH = 128  # columns whose updates are gathered before they reach the rest of the matrix


class Grid(Protocol):
    """Where a storage type's values lie, and what it stores for the values chosen."""

    group_size: int | None  # columns that share scales: `start_group` is called at each multiple

    def start_group(self, column: int, weights: torch.Tensor) -> None:
        """Fix the scales of columns [column, column + group_size) from `weights` (out, group_size),
        the weights of those columns as GPTQ has updated them so far."""

    def round(self, column: int, weights: torch.Tensor) -> torch.Tensor:
        """Round column `column` (out,) onto the grid, remember its codes, return the values they
        decode to (out,), exactly as the stored weight will decode."""


class IntegerGrid:
    """Integers, for the example above."""

    group_size = None

    def __init__(self, weight: torch.Tensor):
        self.q = torch.empty_like(weight)

    def round(self, column: int, weights: torch.Tensor) -> torch.Tensor:
        self.q[:, column] = weights.round()
        return self.q[:, column]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, name: str = "weight",
                  dampening: float = DAMPENING) -> None:
    """Round `weight` (out, in; any float dtype) onto `grid` with GPTQ's error compensation, given
    `hessian` (in, in) of the layer's inputs; `grid` remembers the codes. Computes in fp32 on the
    device `hessian` is on. Columns no input ever reached (zero diagonal) are rounded from 0."""
    device = hessian.device
    W = weight.to(device, torch.float32, copy=True)                                   # (out, in)
    H = hessian.to(torch.float32, copy=True)                                           # (in, in)
    columns = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(dampening * torch.diagonal(H).mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
        Hinv = torch.linalg.cholesky(inverse, upper=True)                              # (in, in) upper
    except torch.linalg.LinAlgError:
        raise QuantizationError(name, "the calibration inputs' Hessian is not positive definite even after "
                                "dampening", "Calibrate on more (and more varied) text, or use --method search.") from None
    group = grid.group_size or columns
    batch = max(LAZY_BATCH, group) if grid.group_size else LAZY_BATCH
    for first in range(0, columns, batch):
        last = min(first + batch, columns)
        W1 = W[:, first:last].clone()                                                  # (out, b)
        errors = torch.zeros_like(W1)                                                  # (out, b)
        Hinv1 = Hinv[first:last, first:last]                                           # (b, b)
        for i in range(last - first):
            column = first + i
            if grid.group_size and column % group == 0:
                grid.start_group(column, W1[:, i:i + group])
            w = W1[:, i]
            error = (w - grid.round(column, w)) / Hinv1[i, i]
            W1[:, i:].sub_(error.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            errors[:, i] = error
        W[:, last:].sub_(errors @ Hinv[first:last, last:])
