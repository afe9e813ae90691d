"""Uniform (spatially even) visual-token selection: a content-blind, position-only baseline.

Not a paper's method but the usual "uniform / grid sampling" control of the token-pruning literature.
Interpretation (``N`` tokens, keep ``k``), all in exact integer arithmetic on the input's device:

* ``even(c, M)`` = the ``c`` centred, evenly strided positions ``floor((2i + 1) * M / (2c))``,
  ``i = 0..c-1`` of ``range(M)`` -- a linspace that leaves equal margins at both ends; its values are
  distinct whenever ``c <= M``.
* ``N`` a perfect square ``s * s`` (one image tile in raster order, e.g. LLaVA-1.5's 24 x 24): a ``a x b``
  sub-grid with ``a = floor(sqrt(k))`` rows and ``b = min(s, k // a)`` columns, rows ``even(a, s)`` and
  columns ``even(b, s)``; the ``k - a*b < a`` left over are ``even(k - a*b, M)`` over the ``M`` positions not
  yet picked, in raster order.
* Otherwise (e.g. LLaVA-NeXT's multi-tile sequences with newline tokens): ``even(k, N)`` over the 1-D
  token order.

Ignores the features, the text and the attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import TokenSelector, positions_where_false


def even_positions(count: int, total: int, device: torch.device) -> Tensor:
    """``floor((2i + 1) * total / (2 * count))`` for ``i < count``: centred even stride, distinct if count <= total."""
    steps = torch.arange(count, device=device)
    return torch.div((2 * steps + 1) * total, 2 * count, rounding_mode="floor")


def grid_positions(side: int, k: int, device: torch.device) -> Tensor:
    """``k`` spatially even positions on a ``side x side`` raster grid (``1 <= k < side * side``)."""
    num_tokens = side * side
    rows_count = math.isqrt(k)
    cols_count = min(side, k // rows_count)
    rows = even_positions(rows_count, side, device)
    cols = even_positions(cols_count, side, device)
    grid = (rows[:, None] * side + cols[None, :]).reshape(-1)
    extra = k - grid.numel()
    if extra == 0:
        return grid
    taken = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill_(0, grid, True)
    free = positions_where_false(taken, num_tokens - grid.numel())
    return torch.cat([grid, free[even_positions(extra, free.numel(), device)]])


@dataclass
class UniformSelector(TokenSelector):
    """Spatially even subset: a 2-D sub-grid when ``N`` is a perfect square, else a 1-D stride."""

    name: ClassVar[str] = "uniform"

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Tensor:
        num_tokens = visual.shape[0]
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:
            return grid_positions(side, k, visual.device)
        return even_positions(k, num_tokens, visual.device)
