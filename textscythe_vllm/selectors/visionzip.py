"""VisionZip: keep the dominant (most attended) tokens and merge the rest into a few contextual tokens.

Paper: Senqiao Yang, Yukang Chen, Zhuotao Tian, Chengyao Wang, Jingyao Li, Bei Yu, Jiaya Jia. "VisionZip:
Longer is Better but Not Necessary in Vision Language Models". CVPR 2025.

Interpretation (``k`` kept rows):

* dominant: ``d = floor(dominant_ratio * k)`` tokens with the largest encoder [CLS] attention (``attention``;
  ties -> lower index), kept unchanged. The default ``dominant_ratio = 54/64`` reproduces the paper's splits
  54 + 10 (k = 64), 108 + 20 (k = 128) and 162 + 30 (k = 192). Clamps: when ``0 < dominant_ratio < 1``, at
  least one dominant token and, for ``k >= 2``, at least one contextual token (so ``k = 1`` keeps the single
  most attended token); ``dominant_ratio = 0`` is all-contextual and ``1`` is pure top-attention pruning.
* contextual: of the remaining tokens in position order, every ``step = max(1, R // c)``-th (the first
  ``c = k - d``) is a merge target, as in the official code; every other remaining token is assigned to its
  most cosine-similar target and each target's row becomes the mean of ``{target} + assigned tokens``
  (:func:`~textscythe_vllm.selectors.base.dominant_contextual_merge`). Each contextual row stands at its
  target's position.

Deviations, by design: the official code runs inside the CLIP encoder (penultimate layer), always keeps the
[CLS] token, measures similarity on that layer's head-averaged keys and returns ``target + mean(assigned)``;
here the selector sees only the projected patch tokens, so similarity is on those features and a contextual
row is the plain group mean (which stays on the scale of the LLM's input embeddings). ``attention=None`` is
treated as all-equal attention: the first ``d`` tokens become the dominant ones.
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
    dominant_contextual_merge,
    ratio_count,
)


def dominant_count(dominant_ratio: float, k: int) -> int:
    """``floor(ratio * k)``; for ``0 < ratio < 1`` clamped to ``[1, k - 1]`` (to ``1`` when ``k = 1``)."""
    count = ratio_count(dominant_ratio, k)
    if 0.0 < dominant_ratio < 1.0:
        count = max(1, min(count, k - 1))
    return count


@dataclass
class VisionZipSelector(TokenSelector):
    """Dominant tokens by [CLS] attention + contextual merging (VisionZip); see module docstring."""

    name: ClassVar[str] = "visionzip"
    uses_attention: ClassVar[bool] = True

    dominant_ratio: float = 54 / 64

    def __post_init__(self) -> None:
        self.dominant_ratio = check_fraction("dominant_ratio", self.dominant_ratio)

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Selection:
        if attention is None:
            attention = torch.zeros(visual.shape[0], dtype=visual.dtype, device=visual.device)
        return dominant_contextual_merge(visual, attention, dominant_count(self.dominant_ratio, k), k)
