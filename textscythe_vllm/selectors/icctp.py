"""ICCTP: global attention preselection plus instruction-anchored clustering of the remaining tokens.

Paper: Yunqian Yu, Biao Chen, Yunya Zhang, Tonglan Xie, Mengmeng Jing, Lin Zuo. "Instruction-Guided
Cross-Modal Clustering for Training-Free Visual Token Pruning in Vision-Language Models". AAAI 2026
(Eqs. 5-13, Algorithm 1; rho_g = 0.6 and alpha = 0.3 from the ablations).

Interpretation (``N`` tokens, keep ``k``):

1. Global preselection (Eq. 7): ``G`` = the ``k_g = floor(rho_g * k)`` tokens with the largest encoder
   [CLS] attention (ties -> lower index).
2. Anchors: **every text token is an anchor** (its embedding is the cluster centre). The paper extracts noun
   phrases with spaCy and averages their sub-word embeddings (Eq. 8); this plugin has no spaCy, so no
   part-of-speech filtering or phrase averaging is done.
3. Clustering (Eqs. 9-10): each token outside ``G`` joins the anchor with the largest cosine similarity
   (ties -> lower text index).
4. Score (Eq. 11): ``s_j = alpha * cos(V_j, c_{pi(j)}) + (1 - alpha) * a~_j`` with ``a~`` the attention
   min-max normalised over all ``N`` tokens (zeros when absent or constant).
5. Quotas (Eq. 12): with ``r = k - k_g`` slots left for the ``n_r = N - k_g`` clustered tokens, the
   cluster-level ratio is ``rho_c = r / n_r`` and a non-empty cluster ``C_j`` gets
   ``k_j = max(1, floor(r * |C_j| / n_r))`` (exact integer arithmetic). These quotas need not sum to ``r``,
   so the final ``r`` tokens are taken by priority tier, then score (descending), then index:
   tier 1 = each non-empty cluster's best-scoring token, tier 2 = the other tokens within their cluster's
   quota, tier 3 = everything else. Hence: if there are more non-empty clusters than ``r``, the ``r``
   best cluster heads; if the quotas overshoot, every cluster keeps its head and the overshoot is trimmed
   from the lowest-scoring quota tokens; if they undershoot, the gap is filled with the best-scoring
   remaining tokens regardless of cluster. Exactly ``k`` tokens, computed with sorts and no loop over
   clusters.
6. No anchors (``T = 0``): the rest is filled by attention too, i.e. plain top-``k`` attention.

``attention=None`` is treated as all-equal attention (``G`` = the first ``k_g`` tokens, ``a~ = 0``).
Pure pruning. ``info`` carries ``global_mask [N]`` and ``cluster [N]`` (anchor index; ``-1`` inside ``G``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import (
    Selection,
    TokenSelector,
    check_fraction,
    l2_normalize,
    minmax_normalize,
    ratio_count,
    stable_top_k,
)


def rank_within_groups(score: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Rank of each item inside its group by ``score`` (descending, ties -> lower index), and group sizes.

    ``group``: LongTensor ``[N]`` with values in ``[0, num_groups)``. Returns ``(rank [N], sizes [num_groups])``.
    Two stable sorts and a compare-and-sum; no host synchronisation.
    """
    num_items = score.shape[0]
    by_score = torch.sort(score, descending=True, stable=True).indices
    order = by_score[torch.sort(group[by_score], stable=True).indices]  # grouped, best first within group
    sizes = (group[:, None] == torch.arange(num_groups, device=group.device)[None, :]).sum(dim=0)
    starts = torch.cumsum(sizes, dim=0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_items, device=group.device) - starts[group[order]]
    return rank, sizes


@dataclass
class IcctpSelector(TokenSelector):
    """Global preselection + text-anchored cluster quotas (ICCTP); see module docstring."""

    name: ClassVar[str] = "icctp"
    uses_text: ClassVar[bool] = True
    uses_attention: ClassVar[bool] = True

    rho_g: float = 0.6
    alpha: float = 0.3

    def __post_init__(self) -> None:
        self.rho_g = check_fraction("rho_g", self.rho_g)
        self.alpha = check_fraction("alpha", self.alpha)

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Selection:
        num_tokens, num_text = visual.shape[0], text.shape[0]
        device = visual.device
        importance = attention if attention is not None else torch.zeros(num_tokens, dtype=visual.dtype,
                                                                          device=device)
        num_global = ratio_count(self.rho_g, k)
        global_picks = stable_top_k(importance, num_global)
        global_mask = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill_(0, global_picks, True)
        if num_text == 0 or num_global == k:
            picks = stable_top_k(importance, k)
            no_cluster = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
            return Selection(indices=picks, info={"global_mask": global_mask, "cluster": no_cluster})

        similarity = l2_normalize(visual) @ l2_normalize(text).T  # [N, T]
        anchor_similarity, cluster = similarity.max(dim=1)  # first max -> lower text index
        score = self.alpha * anchor_similarity + (1.0 - self.alpha) * minmax_normalize(
            attention, num_tokens, like=visual
        )
        group = torch.where(global_mask, num_text, cluster)  # G is its own (last) group
        rank, sizes = rank_within_groups(score, group, num_text + 1)

        slots, clustered = k - num_global, num_tokens - num_global
        quota = torch.where(sizes > 0, torch.clamp(torch.div(slots * sizes, clustered, rounding_mode="floor"),
                                                   min=1), 0)
        tier = torch.where(rank == 0, 1, torch.where(rank < quota[group], 2, 3))
        tier = torch.where(global_mask, 0, tier)
        by_score = torch.sort(score, descending=True, stable=True).indices
        order = by_score[torch.sort(tier[by_score], stable=True).indices]
        cluster_info = torch.where(global_mask, -1, cluster)
        return Selection(indices=order[:k], info={"global_mask": global_mask, "cluster": cluster_info})
