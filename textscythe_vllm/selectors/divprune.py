"""DivPrune: keep a maximally diverse subset of the visual tokens (Max-Min diversity problem).

Paper: Saeed Ranjbar Alvar, Gursimran Singh, Mohammad Akbari, Yong Zhang. "DivPrune: Diversity-based Visual
Token Pruning for Large Multimodal Models". CVPR 2025.

Interpretation (as in the official code, on the projected visual features):

* distance ``d(i, j) = 1 - cos(V_i, V_j)``;
* first pick: the token whose nearest neighbour (excluding itself) is farthest, i.e.
  ``argmax_j min_{i != j} d(i, j)`` -- the official code's second-smallest entry of each distance column
  (the smallest being the token itself); here the self-distance is excluded explicitly, which equals it up to
  the rounding of ``d(j, j)``;
* then, ``k - 1`` times: add the not-yet-picked token maximising its min distance to the picked set.

Ties go to the lower index (``argmax`` takes the first maximum). Picked tokens are masked out explicitly, so
``k`` distinct tokens come back even when many rows are identical (the official code could re-pick one).
Cost: the nearest-neighbour pass needs the whole ``N x N`` similarity (``base.cosine_gram``: each
off-diagonal block once, ~half a GEMM). Up to ``N = 4096``
(``base.GRAM_MAX_ELEMENTS`` entries; 33 MB at N = 2880 in float32) it is kept and each greedy step is a row
gather, an in-place ``minimum`` and an ``argmax`` over ``[N]``, as in the official code's full distance
matrix; above that the similarity is computed in row chunks (never more than ``_CHUNK_ELEMENTS`` entries at
once) and each step is one ``[N, D] @ [D]`` product into a preallocated buffer. No host synchronisation in
either loop. Text and attention are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import (
    GRAM_MAX_ELEMENTS,
    TokenSelector,
    cosine_gram,
    gather_rows,
    greedy_by_penalty_rows,
    scratch,
    unit_rows,
)

#: the most similarity entries materialised at once in the nearest-neighbour pass (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


def nearest_neighbour_similarity(unit: Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """``max_{i != j} cos(V_i, V_j)`` for every ``j`` of L2-normalised rows ``unit [N, D]`` -> ``[N]``.

    ``N = 1`` gives ``-inf`` (no neighbour).
    """
    num_tokens = unit.shape[0]
    rows_per_chunk = max(1, chunk_elements // max(1, num_tokens))
    best = torch.empty(num_tokens, dtype=unit.dtype, device=unit.device)
    for start in range(0, num_tokens, rows_per_chunk):
        stop = min(num_tokens, start + rows_per_chunk)
        similarity = unit[start:stop] @ unit.T  # [chunk, N]
        similarity.narrow(1, start, stop - start).diagonal().fill_(-math.inf)  # drop self-similarity
        best[start:stop] = similarity.amax(dim=1)
    return best


@dataclass
class DivPruneSelector(TokenSelector):
    """Greedy Max-Min diversity on cosine distance (DivPrune); see module docstring."""

    name: ClassVar[str] = "divprune"

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Tensor:
        unit = unit_rows(visual)
        num_tokens = visual.shape[0]
        if num_tokens * num_tokens <= GRAM_MAX_ELEMENTS:
            distance = cosine_gram(unit, out=scratch("gram", (num_tokens, num_tokens), unit))  # [N, N] similarity ...
            distance.diagonal().fill_(-math.inf)  # ... without self-similarity
            nearest_distance = 1.0 - distance.amax(dim=1)
            torch.sub(1.0, distance, out=distance)  # ... -> 1 - cos (+inf on the diagonal: never the minimum)
            return greedy_by_penalty_rows(nearest_distance, k, gather_rows(distance))

        nearest_distance = 1.0 - nearest_neighbour_similarity(unit)
        similarity = torch.empty_like(nearest_distance)

        def distance_row(choice: Tensor) -> Tensor:  # 1 - cos(V, V_choice), into one buffer
            torch.mv(unit, unit.index_select(0, choice).squeeze(0), out=similarity)
            return torch.sub(1.0, similarity, out=similarity)

        return greedy_by_penalty_rows(nearest_distance, k, distance_row)
