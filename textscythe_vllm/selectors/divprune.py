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
Cost: the nearest-neighbour pass is one ``N x N`` similarity computed in row chunks (never more than
``_CHUNK_ELEMENTS`` entries at once); each greedy step is one ``[N, D] @ [D]`` product plus a running
min-distance vector, with no host synchronisation. Text and attention are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import TokenSelector, l2_normalize

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
        unit = l2_normalize(visual)
        positions = torch.arange(visual.shape[0], device=visual.device)
        nearest_distance = 1.0 - nearest_neighbour_similarity(unit)
        choice = torch.argmax(nearest_distance)
        picks = [choice]
        taken = positions == choice
        # Running min distance to the picked set; index_select with a 1-element index tensor, because
        # indexing with a 0-dim tensor would call .item() (a host sync on accelerators).
        min_distance = 1.0 - unit @ unit.index_select(0, choice.view(1)).squeeze(0)
        blocked = torch.full_like(min_distance, -math.inf)
        for _ in range(k - 1):
            choice = torch.argmax(torch.where(taken, blocked, min_distance))
            picks.append(choice)
            taken = taken | (positions == choice)
            min_distance = torch.minimum(
                min_distance, 1.0 - unit @ unit.index_select(0, choice.view(1)).squeeze(0)
            )
        return torch.stack(picks)
