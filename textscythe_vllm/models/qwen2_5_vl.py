"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) with TextScythe pruning of images and videos.

Visual tokens: the vision tower's output after the patch merger -- one row per 2x2 block of 14 px patches
(``spatial_merge_size`` 2), per 2-frame temporal patch for videos; ``t * (h / 2) * (w / 2)`` rows in raster order
(time, row, column). The budget counts the rows of each image, and of each video over all its frames (the
selector chooses jointly over every frame's rows).

Attention (no [CLS] token): for each merged row, the mean attention its patches *receive* at the last
full-attention block of the tower (``max(fullatt_block_indexes)``)::

    a_p = 1/H * sum_h  1/L * sum_{i in S(p)}  softmax_j( q_i^h . k_j^h / sqrt(d) )_p      (patch p)
    A_m = mean of a_p over the 4 patches merged into row m

``S(p)`` is the full-attention sequence holding patch ``p`` -- one image, or one temporal patch of a video
(vLLM's and transformers' ``cu_seqlens``) -- and ``L = |S(p)|``; ``q`` and ``k`` are that block's queries and
keys *after* its 2-D rotary embedding. They are read off vLLM's own forward pass with a forward hook on the
block's rotary module (:class:`~textscythe_vllm.probes.RotaryAttentionProbe`); the column means are computed per sequence in query
chunks, so no ``L x L`` matrix is held whole and vLLM's attention backend is untouched.

Positions (M-RoPE): every kept row keeps its *original* ``(t, h, w)`` position, and text after an item keeps
the position it has in the unpruned prompt (so does the first generated token): a pruned item's placeholders
all get the item's base position (its first grid cell), the text after it continues from ``base + span``, and
each row carries its offset (:mod:`textscythe_vllm.models.mrope`).

Not combinable with vLLM's EVS (``--video-pruning-rate > 0``): then this class behaves exactly as stock vLLM
and budgets are refused. Pruned requests need the eager vision encoder (encoder CUDA graphs are turned off for
this model) and a single pipeline stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, explain
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from textscythe_vllm.models.mrope import MRopeProcessor, MRopeRows
from textscythe_vllm.probes import RotaryAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel

logger = logging.getLogger(LOGGER_NAME)

MODALITIES = ("image", "video")


def grid_positions(t: int, h: int, w: int, t_factor: float) -> np.ndarray:
    """``[3, t*h*w]`` int64 M-RoPE offsets of an item's merged grid in raster order, exactly as stock vLLM's
    ``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`` lays them out (before adding the base)."""
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.reshape(3, -1)


def merged_row_attention(visual: torch.nn.Module, patches: Tensor, grid_thw: Sequence[Sequence[int]]) -> list[Tensor]:
    """Per item ``[t * h/m * w/m]``: the per-patch values averaged over each merged row's ``m*m`` patches, taken
    from the tower's window order back to raster order."""
    merged = patches.reshape(-1, visual.spatial_merge_unit).mean(dim=1)  # window order, one value per merged row
    items, offset = [], 0
    for t, h, w in grid_thw:
        window_index, _ = visual.get_window_index_thw(int(t), int(h), int(w))
        count = window_index.numel()
        raster = torch.empty(count, dtype=merged.dtype, device=merged.device)
        raster[window_index.to(merged.device)] = merged[offset:offset + count]
        items.append(raster)
        offset += count
    return items


class TextScytheQwen2_5_VLMultiModalProcessor(MRopeProcessor, PruningProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheQwen2_5_VLMultiModalProcessor,
    info=with_plugin_context(Qwen2_5_VLProcessingInfo),
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TextScytheQwen2_5_VLForConditionalGeneration(MRopeRows, PruningModel, Qwen2_5_VLForConditionalGeneration):
    pruned_modalities = MODALITIES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM's EVS owns positions when it is on; this class then stays stock (the processor refuses budgets).
        self._positions_owned_by_vllm = bool(self.is_multimodal_pruning_enabled)
        self._rows_width = vllm_config.model_config.get_inputs_embeds_size()
        self.attention_probe = None if self.use_data_parallel else RotaryAttentionProbe.for_vision_attention(
            self.visual.blocks[max(self.visual.fullatt_block_indexes)].attn)  # the last full-attention block
        if vllm_config.parallel_config.pipeline_parallel_size > 1 and not self._positions_owned_by_vllm:
            logger.warning("textscythe: Qwen2.5-VL requests with a visual_token_budget need a single pipeline "
                           "stage; later stages would place the kept visual tokens at their item's first position")

    # -- encoder ------------------------------------------------------------------------------------------

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        features, attention, seconds = self.features_and_attention(
            modality, modality_input, self.attention_probe if with_attention else None,
            lambda patches, grid_thw: merged_row_attention(self.visual, patches, grid_thw))
        grid_thw = [[int(v) for v in row] for row in modality_input[f"{modality}_grid_thw"].tolist()]
        merge = self.visual.spatial_merge_size
        layouts = ([explain.patch_grid(h // merge, w // merge, t, region="whole") for t, h, w in grid_thw]
                   if with_layouts else None)
        return EncodedItems(features, attention, None, layouts, seconds)

    def place_rows(self, modality: str, modality_input: Any, index: int, rows: Tensor, kept: Tensor) -> Tensor:
        t, h, w = (int(v) for v in modality_input[f"{modality}_grid_thw"][index].tolist())
        merge = self.visual.spatial_merge_size
        relative = grid_positions(t, h // merge, w // merge, self._t_factor(modality, modality_input, index))
        relative = torch.from_numpy(relative).to(kept.device)[:, kept]  # [3, K]
        return self.with_position_channels(rows, relative)

    def _t_factor(self, modality: str, modality_input: Any, index: int) -> float:
        """Temporal position step of item ``index``, as stock vLLM's ``iter_mm_grid_thw`` computes it."""
        if modality == "image":
            return 1.0
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = modality_input.get("second_per_grid_ts")
        second_per_grid = 1.0 if seconds is None else float(seconds[index].item())
        return second_per_grid * tokens_per_second

    def get_encoder_cudagraph_config(self) -> Any:
        # Captured encoder graphs bypass embed_multimodal (no pruning: more rows than placeholders).
        config = super().get_encoder_cudagraph_config()
        return config if self._positions_owned_by_vllm else replace(config, modalities=[])

    # -- positions ----------------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        grids = list(self.iter_mm_grid_thw(features))  # (offset, t, h, w, t_factor), same order
        lengths = [feature.mm_position.length for feature in features]
        if self._positions_owned_by_vllm or all(length == t * h * w for (_, t, h, w, _), length in zip(grids, lengths, strict=True)):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return self.guarded_positions(lambda: _pruned_layout(grids, lengths, len(input_tokens)), len(input_tokens))


def _pruned_layout(grids: list[tuple[int, int, int, int, float]], lengths: list[int], num_tokens: int) -> tuple[Tensor, int]:
    """Stock Qwen2.5-VL positions, except that a pruned item's placeholders all carry its base position and the
    text after it keeps its unpruned position."""
    blocks = []
    consumed = 0  # prompt tokens laid out so far
    next_position = 0  # position of the next token in the *unpruned* layout
    for (offset, t, h, w, t_factor), length in zip(grids, lengths, strict=True):
        text = offset - consumed
        blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        base = next_position + text
        grid = grid_positions(t, h, w, t_factor)
        if length == t * h * w:
            blocks.append(grid + base)
        else:  # pruned: base everywhere; forward() adds each kept row's own offset
            blocks.append(np.full((3, length), base, dtype=np.int64))
        next_position = base + int(grid.max()) + 1
        consumed = offset + length
    text = num_tokens - consumed
    blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
    positions = np.concatenate(blocks, axis=1).astype(np.int64)
    return torch.from_numpy(positions), next_position + text - num_tokens
