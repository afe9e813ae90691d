"""DART: keep the visual tokens least duplicated with a few pivot tokens.

Paper: Z. Wen, Y. Gao, S. Wang, J. Zhang, Q. Zhang, W. Li, C. He, L. Zhang. "Stop Looking for Important
Tokens in Multimodal Language Models: Duplication Matters More". arXiv:2502.11494, 2025.

Interpretation (pre-LLM variant):

* pivots: the ``p = min(num_pivots, k)`` tokens with the largest L2 norm of their projected features
  (ties -> lower index) -- DART's default pivot criterion is the norm of the tokens' layer-2 key states
  ("K-norm"), which do not exist before the LLM;
* the other ``k - p`` tokens: among the non-pivots, those with the smallest duplication
  ``max_{pivot} cos(V_j, V_pivot)`` -- the least similar to every pivot (ties -> lower index).

Deviations, by design: DART prunes *inside* the LLM after layer 2, measuring norms and similarities on that
layer's key/hidden states and also using a few text tokens as pivots; here it runs *before* the LLM on the
projected visual features, with image pivots only (the instruction's layer-2 states do not exist yet). The
official code also splits the budget per pivot (each pivot in turn takes the ``(k - p) // p`` tokens least
similar to *it*); this selector uses the single global rule above instead (least similar to the *closest*
pivot), which also gives exactly ``k`` tokens.
Pure pruning; text and attention are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import TokenSelector, check_integer, l2_normalize, stable_top_k


@dataclass
class DartSelector(TokenSelector):
    """Pivots by feature norm, then least-duplicated tokens (DART); see module docstring."""

    name: ClassVar[str] = "dart"

    num_pivots: int = 8

    def __post_init__(self) -> None:
        self.num_pivots = check_integer("num_pivots", self.num_pivots, minimum=1)

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Tensor:
        num_pivots = min(self.num_pivots, k)
        pivots = stable_top_k(torch.linalg.vector_norm(visual, dim=1), num_pivots)
        if num_pivots == k:
            return pivots
        unit = l2_normalize(visual)
        duplication = (unit @ unit[pivots].T).amax(dim=1)  # [N]
        is_pivot = torch.zeros(visual.shape[0], dtype=torch.bool, device=visual.device).index_fill_(
            0, pivots, True
        )
        rest = stable_top_k(torch.where(is_pivot, -math.inf, -duplication), k - num_pivots)
        return torch.cat([pivots, rest])
