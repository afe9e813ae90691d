"""VisionDrop, pre-LLM stage: dominant tokens by visual-to-visual attention plus contextual merging.

Paper: Rui Xu, Yunke Wang, Yong Luo, Bo Du. "Rethinking Visual Token Reduction in LVLMs under Cross-modal
Misalignment" (VisionDrop). arXiv:2506.22283, 2025 (AAAI 2026).

VisionDrop is a progressive, visual-only pipeline: at the end of the vision encoder and again after several
LLM layers it keeps the *dominant* tokens (ranked by intra-modal, visual-to-visual attention -- optionally
with the [CLS] token as the query) and merges the rest by similarity into a few *contextual* tokens. **Only
the first stage, before the LLM, is implemented here; the in-LLM stages are out of scope by design** (this
plugin prunes once, before prefill, and never touches the LLM's layers).

Interpretation (``k`` kept rows):

* importance: ``attention`` when given (the encoder's [CLS]-query attention -- the paper's optional [CLS]
  variant, and what the official code's encoder stage uses); otherwise the mean attention each token receives
  from all visual tokens, ``mean_i softmax_j(V_i . V_j / sqrt(D))``, on the projected features, computed in
  row chunks so the ``N x N`` matrix is never materialised at once;
* dominant: ``d = floor(dominant_ratio * k)`` tokens with the largest importance (ties -> lower index; same
  clamps as VisionZip: at least one dominant and, for ``k >= 2``, at least one contextual token when
  ``0 < dominant_ratio < 1``). Default ``7/8`` = the official encoder-stage example, 42 dominant + 6
  contextual;
* contextual: identical to VisionZip's merging (every ``step``-th remaining token is a target, every other
  remaining token joins its most cosine-similar target, a contextual row is its group's mean) -- see
  :func:`~textscythe_vllm.selectors.base.dominant_contextual_merge`.
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
    dominant_contextual_merge,
)
from textscythe_vllm.selectors.visionzip import dominant_count

#: the most attention entries materialised at once (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


def received_attention(visual: Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Mean attention each token receives, ``mean_i softmax_j(V_i . V_j / sqrt(D))`` -> ``[N]`` (sums to 1)."""
    num_tokens, dim = visual.shape
    scale = 1.0 / math.sqrt(max(1, dim))
    rows_per_chunk = max(1, chunk_elements // num_tokens)
    total = torch.zeros(num_tokens, dtype=visual.dtype, device=visual.device)
    for start in range(0, num_tokens, rows_per_chunk):
        logits = (visual[start:start + rows_per_chunk] @ visual.T) * scale  # [chunk, N]
        total = total + torch.softmax(logits, dim=-1).sum(dim=0)
    return total / num_tokens


@dataclass
class VisionDropSelector(TokenSelector):
    """VisionDrop's pre-LLM stage (dominant by visual attention + contextual merging); see module docstring."""

    name: ClassVar[str] = "visiondrop"
    uses_attention: ClassVar[bool] = True

    dominant_ratio: float = 7 / 8

    def __post_init__(self) -> None:
        self.dominant_ratio = check_fraction("dominant_ratio", self.dominant_ratio)

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Selection:
        importance = received_attention(visual) if attention is None else attention
        return dominant_contextual_merge(visual, importance, dominant_count(self.dominant_ratio, k), k)
