"""TextScythe: "What You Say is What You See" -- understand-then-prune visual token selection.

Paper: TextScythe (Sec. 3, Eqs. 1-7; hyper-parameter alpha = 0.7 from the appendix). The instruction is
distilled into a few vision-critical text tokens with the Entropy-Ratio metric; the visual tokens those
anchors point at are kept; the rest of the budget is filled with high-attention, mutually diverse tokens.

Interpretation pinned by the project (docs/how-it-works.md repeats it with the equations):

1. ``S`` = cosine similarity of L2-normalised text and visual rows ``[T, N]``; ``P_i = softmax(S_i)`` over
   the N visual tokens, no temperature (Eq. 1).
2. ``ER_i = H(P_i) / (max_j P_ij / mean_j P_ij)``, natural log (Eq. 2).
3. ``lambda = alpha * (round(log10(T)) + 1)`` (round to nearest); ``tau = mean(ER) - lambda * std(ER)`` with
   the population std (Eq. 3).
4. Key text tokens: ``ER_i < tau`` strictly (Eq. 4); none (e.g. ``T = 1``) gives an empty relevant set.
5. ``V_rel^i = {j : P_ij > mean_j P_i + lambda * std_j P_i}`` (population std, same lambda); ``V_rel`` is
   their union over the key tokens (Eqs. 5, 6).
6. If ``|V_rel| > K``: keep the K members with the largest ``max_{i in key} P_ij``; ties -> lower index.
7. Fill from ``R = V \\ V_rel`` (Eq. 7): attention ``A`` min-max normalised over all N tokens (zeros when
   constant or absent). First pick ``argmax_R A``; then ``score_j = A_j - max_{k in V_sup} cos(V_j, V_k)``
   (max over ``V_sup`` only, as in the paper), argmax with ties -> lower index, until ``K`` are chosen.
8. Output: the sorted union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import (
    Selection,
    TokenSelector,
    check_fraction,
    greedy_diverse_fill,
    l2_normalize,
    minmax_normalize,
    stable_top_k,
    unit_rows,
)


def _real_spread(std: Tensor, mean: Tensor) -> Tensor:
    """``std`` above rounding noise relative to ``mean`` (elementwise bool)."""
    return std > 64 * torch.finfo(std.dtype).eps * mean.abs()


def threshold_scale(num_text_tokens: int, alpha: float) -> float:
    """``lambda = alpha * (round(log10(T)) + 1)`` (Eq. 3), rounding half up; ``T >= 1``."""
    return alpha * (math.floor(math.log10(num_text_tokens) + 0.5) + 1)


def similarity_distribution(text: Tensor, visual: Tensor) -> Tensor:
    """``P = softmax(cos(T, V))`` over the visual tokens (Eq. 1): ``[T, D] x [N, D] -> [T, N]`` float."""
    return torch.softmax(l2_normalize(text) @ l2_normalize(visual).T, dim=-1)


def _entropy_ratio_from_probs(probs: Tensor) -> Tensor:
    entropy = -(probs * torch.log(probs)).sum(dim=-1)  # [T]; softmax of cosines never underflows to 0
    peak_ratio = probs.amax(dim=-1) / probs.mean(dim=-1)  # [T]
    return entropy / peak_ratio


def entropy_ratio(text: Tensor, visual: Tensor) -> Tensor:
    """Entropy-Ratio of every text token (Eq. 2): ``text [T, D]``, ``visual [N, D]`` -> ``[T]`` (float32+)."""
    score_dtype = torch.float64 if visual.dtype == torch.float64 else torch.float32
    return _entropy_ratio_from_probs(
        similarity_distribution(text.to(visual.device, score_dtype), visual.to(score_dtype))
    )


@dataclass
class TextScytheSelector(TokenSelector):
    """TextScythe (see module docstring). ``alpha`` scales both adaptive thresholds (paper default 0.7)."""

    name: ClassVar[str] = "textscythe"
    uses_text: ClassVar[bool] = True
    uses_attention: ClassVar[bool] = True

    alpha: float = 0.7

    def __post_init__(self) -> None:
        self.alpha = check_fraction("alpha", self.alpha, low=0.0, high=math.inf)

    def relevant_tokens(self, visual: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-5: returns ``(key_text_mask [T], relevant_mask [N], key_strength [N])``.

        ``visual`` must be L2-normalised already. ``key_strength_j = max_{i in key} P_ij`` (``-inf`` where no key
        token exists) ranks ``V_rel`` (step 6). A spread at rounding level (identical text tokens, identical
        visual tokens) counts as no spread: it selects nothing rather than whichever row rounded lowest.
        """
        num_text, num_visual = text.shape[0], visual.shape[0]
        if num_text == 0:
            no_key = torch.zeros(0, dtype=torch.bool, device=visual.device)
            no_rel = torch.zeros(num_visual, dtype=torch.bool, device=visual.device)
            return no_key, no_rel, torch.full((num_visual,), -math.inf, dtype=visual.dtype, device=visual.device)
        scale = threshold_scale(num_text, self.alpha)
        probs = torch.softmax(l2_normalize(text) @ visual.T, dim=-1)  # [T, N] (Eq. 1)
        ratios = _entropy_ratio_from_probs(probs)  # [T]
        ratio_mean, ratio_std = ratios.mean(), ratios.std(correction=0)
        key_text = (ratios < ratio_mean - scale * ratio_std) & _real_spread(ratio_std, ratio_mean)  # [T]
        prob_mean, prob_std = probs.mean(dim=-1), probs.std(dim=-1, correction=0)  # [T]
        per_token_threshold = prob_mean + scale * prob_std
        anchored = (probs > per_token_threshold[:, None]) & (key_text & _real_spread(prob_std, prob_mean))[:, None]
        relevant = anchored.any(dim=0)  # [N]
        key_strength = torch.where(key_text[:, None], probs, -math.inf).amax(dim=0)  # [N]
        return key_text, relevant, key_strength

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Selection:
        unit_visual = unit_rows(visual)  # [N, D], shared by the similarity and the diversity terms
        key_text, relevant, key_strength = self.relevant_tokens(unit_visual, text)
        num_relevant = int(relevant.sum())  # the one host sync: it sizes the fill loop below
        if num_relevant >= k:
            chosen = stable_top_k(torch.where(relevant, key_strength, -math.inf), k)
        else:
            importance = minmax_normalize(attention, visual.shape[0], like=visual)
            num_candidates = visual.shape[0] - num_relevant
            background = greedy_diverse_fill(
                unit_visual, importance, ~relevant, k - num_relevant, num_candidates=num_candidates
            )
            chosen = torch.cat([relevant.nonzero().squeeze(1), background])
        return Selection(indices=chosen, info={"key_text_mask": key_text, "relevant_mask": relevant})
