"""FasterVLM: keep the visual tokens the vision encoder's [CLS] token attends to most.

Paper: Q. Zhang, A. Cheng, M. Lu, Z. Zhuo, M. Wang, J. Cao, S. Guo, Q. She, S. Zhang. "[CLS] Attention is
All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster". arXiv:2412.01818, 2024
(later extended as VisPruner, ICCV 2025).

Interpretation: ``attention[j]`` is the head-averaged attention the encoder's [CLS] query pays to patch ``j``
(or, for encoders without a [CLS] token, the mean attention patch ``j`` receives -- whatever the vLLM glue
supplies as ``attention``); keep the ``k`` tokens with the largest value, ties -> lower index. Pure pruning:
the kept rows are the projected features unchanged. With ``attention=None`` every token is treated as
equally attended, so the stable ranking keeps the first ``k`` tokens (documented fallback, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from textscythe_vllm.selectors.base import TokenSelector, stable_top_k


@dataclass
class ClsAttentionSelector(TokenSelector):
    """Top-``k`` by encoder [CLS] attention (FasterVLM); see module docstring."""

    name: ClassVar[str] = "cls_attention"
    uses_attention: ClassVar[bool] = True

    def _select(self, visual: Tensor, text: Tensor, attention: Tensor | None, k: int) -> Tensor:
        if attention is None:
            attention = torch.zeros(visual.shape[0], dtype=visual.dtype, device=visual.device)
        return stable_top_k(attention, k)
