"""Qwen3-VL (dense and MoE) and Qwen3.5 (dense and MoE) with TextScythe pruning of images and videos.

Visual tokens: the vision tower's output after the patch merger -- one row per 2x2 block of 16 px patches, per
2-frame temporal patch for videos; an item has ``t * (h/2) * (w/2)`` rows in raster order. Each row is
``[main | DeepStack level 1 | ... | level L]`` on the hidden dimension (vLLM splits the levels off after
``embed_multimodal`` and adds level ``i`` after LLM layer ``i``). Selection reads the main level only; whole
rows are kept, so every DeepStack level keeps exactly the main level's tokens (a merged row of visionzip /
visiondrop carries the DeepStack rows of its selector index). Qwen3.5 has no DeepStack levels.

Videos: the prompt lays out each temporal patch ("frame") as its own run, ``<t seconds><|vision_start|>`` +
placeholders + ``<|vision_end|>``. The budget counts the whole video and is spread over its frames
(:func:`~textscythe_vllm.processing.spread_budget`): each frame keeps its share, chosen within the frame, and every
timestamp stays.

Attention (no [CLS]): for each merged row, the mean attention its 4 patches *receive* at the tower's last block,
averaged over heads and over the queries of the patch's sequence (one image, or one frame: vLLM's
``cu_seqlens``), with that block's queries and keys *after* its 2-D rotary embedding
(:class:`~textscythe_vllm.probes.RotaryAttentionProbe`). The tower's patches come in 2x2 merge blocks, so
averaging each block of 4 gives the merged rows in raster order.

Positions (interleaved M-RoPE): each image, and each frame of a video, is laid out by vLLM as a ``(0, h, w)``
grid after its text. Kept rows keep their grid position, text after a pruned item or frame keeps its unpruned
position (:mod:`textscythe_vllm.models.mrope`). Not combinable with vLLM's EVS (``--video-pruning-rate > 0``):
then budgets are refused and the model is stock.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm, explain
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from textscythe_vllm.models.mrope import MRopeProcessor, MRopeRows
from textscythe_vllm.probes import RotaryAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel

logger = logging.getLogger(LOGGER_NAME)


class TextScytheQwen3VLMultiModalProcessor(MRopeProcessor, PruningProcessorMixin, Qwen3VLMultiModalProcessor):
    def counting_processor(self, modality: str) -> Any:
        return self.info.get_video_processor() if modality == "video" else self.info.get_image_processor()


def merged_row_attention(visual: torch.nn.Module, patches: Tensor, grid_thw: list[list[int]]) -> list[Tensor]:
    """Per item ``[t * h/2 * w/2]``: the per-patch values (tower order: 2x2 merge blocks in raster order)
    averaged over each merged row's patches."""
    merged = patches.reshape(-1, visual.spatial_merge_unit).mean(dim=1)
    return list(merged.split([t * h * w // visual.spatial_merge_unit for t, h, w in grid_thw]))


class Qwen3VLPruning(MRopeRows, PruningModel):
    """The family's part of the contract; put in front of each of the four vLLM classes."""

    pruned_modalities = ("image", "video")

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._positions_owned_by_vllm = bool(self.is_multimodal_pruning_enabled)
        self._rows_width = self.visual_dim + self.multiscale_dim
        self.attention_probe = None if self.use_data_parallel else RotaryAttentionProbe.for_vision_attention(
            self.visual.blocks[-1].attn)

    def _merged_grid(self, modality: str, modality_input: Any, index: int) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in modality_input[f"{modality}_grid_thw"][index].tolist())
        merge = self.visual.spatial_merge_size
        return t, h // merge, w // merge

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        rows, attention, seconds = self.features_and_attention(  # rows: per item [M, visual_dim * (1 + L)]
            modality, modality_input, self.attention_probe if with_attention else None,
            lambda patches, grid_thw: merged_row_attention(self.visual, patches, grid_thw))
        grids = [self._merged_grid(modality, modality_input, index) for index in range(len(rows))]
        return EncodedItems(
            features=[item[:, :self.visual_dim] for item in rows],
            attention=attention,
            layouts=[explain.patch_grid(h, w, t, region="whole") for t, h, w in grids] if with_layouts else None,
            attention_seconds=seconds,
            segments=[[h * w] * t if modality == "video" else None for t, h, w in grids],
            carried=[item[:, self.visual_dim:] for item in rows] if self.multiscale_dim else None,
        )

    def place_rows(self, modality: str, modality_input: Any, index: int, rows: Tensor, kept: Tensor) -> Tensor:
        _, h, w = self._merged_grid(modality, modality_input, index)
        in_frame = kept % (h * w)  # every frame is its own (0, h, w) grid
        relative = torch.stack([torch.zeros_like(in_frame), in_frame // w, in_frame % w])  # [3, K]
        return self.with_position_channels(rows, relative)

    def get_encoder_cudagraph_config(self) -> Any:
        # Captured encoder graphs bypass embed_multimodal (no pruning: more rows than placeholders).
        config = super().get_encoder_cudagraph_config()
        return config if self._positions_owned_by_vllm else replace(config, modalities=[])

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self._positions_owned_by_vllm:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        runs = []  # (offset, grid h, grid w, placeholders, item pruned) per image and per video frame
        walk = iter(_vllm.qwen3_vl_frame_runs(Qwen3VLForConditionalGeneration, input_tokens, features, self.config))
        for feature in features:
            if feature.modality == "image":  # the walk reports an image's full grid, not its placeholders
                offset, h, w, _ = next(walk)
                item_runs = [(offset, h, w, feature.mm_position.get_num_embeds())]
            else:
                item_runs = [next(walk) for _ in range(int(feature.data["video_grid_thw"].data[0]))]
            pruned = sum(actual for *_, actual in item_runs) != sum(h * w for _, h, w, _ in item_runs)
            runs += [(*run, pruned) for run in item_runs]
        if not any(pruned for *_, pruned in runs):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return self.guarded_positions(lambda: _pruned_layout(runs, len(input_tokens)), len(input_tokens))


def _pruned_layout(runs: list[tuple[int, int, int, int, bool]], num_tokens: int) -> tuple[Tensor, int]:
    """Stock Qwen3-VL positions, except that a pruned item's placeholders all carry their run's base position
    and the text after every run keeps its unpruned position."""
    blocks = []
    consumed = 0  # prompt tokens laid out so far
    next_position = 0  # position of the next token in the *unpruned* layout
    for offset, h, w, actual, pruned in runs:
        text = offset - consumed
        blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        base = next_position + text
        if pruned:  # forward() adds each kept row's own offset
            blocks.append(np.full((3, actual), base, dtype=np.int64))
        else:
            blocks.append(np.indices((1, h, w)).reshape(3, -1) + base)
        next_position = base + max(h, w)  # the full grid's largest position + 1, kept or not
        consumed = offset + actual
    text = num_tokens - consumed
    blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
    positions = np.concatenate(blocks, axis=1).astype(np.int64)
    return torch.from_numpy(positions), next_position + text - num_tokens


def _register(info: Any, model_class: type, name: str) -> type:
    registered = MULTIMODAL_REGISTRY.register_processor(
        TextScytheQwen3VLMultiModalProcessor, info=with_plugin_context(info), dummy_inputs=Qwen3VLDummyInputsBuilder
    )
    return registered(type(name, (Qwen3VLPruning, model_class), {"__module__": __name__}))


TextScytheQwen3VLForConditionalGeneration = _register(
    Qwen3VLProcessingInfo, Qwen3VLForConditionalGeneration, "TextScytheQwen3VLForConditionalGeneration")
TextScytheQwen3VLMoeForConditionalGeneration = _register(
    Qwen3VLMoeProcessingInfo, Qwen3VLMoeForConditionalGeneration, "TextScytheQwen3VLMoeForConditionalGeneration")
TextScytheQwen3_5ForConditionalGeneration = _register(
    Qwen3_5ProcessingInfo, Qwen3_5ForConditionalGeneration, "TextScytheQwen3_5ForConditionalGeneration")
TextScytheQwen3_5MoeForConditionalGeneration = _register(
    Qwen3_5MoeProcessingInfo, Qwen3_5MoeForConditionalGeneration, "TextScytheQwen3_5MoeForConditionalGeneration")
