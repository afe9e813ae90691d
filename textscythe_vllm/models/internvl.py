"""InternVL with TextScythe pruning of images and videos, in both formats vLLM serves:

* the chat format (``InternVLChatModel``: ``OpenGVLab/InternVL2_5-*``, vLLM's ``internvl.py``), and
* the HF format (``InternVLForConditionalGeneration``: ``OpenGVLab/InternVL3-*-hf``, served by vLLM's ``interns1.py``).

Visual tokens, as vLLM lays them out:

* **image**: dynamic tiling -- ``n`` tiles on the aspect-ratio grid closest to the image, then a global thumbnail
  tile (last) whenever ``n > 1`` -- each tile's ``(S/p)^2`` InternViT patches ([CLS] dropped) pixel-shuffled 2x2
  into ``(S/2p)^2`` tokens (``downsample_ratio`` 0.5); one contiguous run of ``tiles * tokens_per_tile``
  placeholders between ``<img>`` and ``</img>``. The budget counts the whole run: tiles and thumbnail together.
* **video**: one tile per frame, each frame's run between ``Frame{i}: <img>`` and ``</img>``. The budget counts the
  whole video and is spread over the frames (:func:`~textscythe_vllm.processing.spread_budget`): the processor
  trims each frame's run, and selection keeps the same quota within each frame (``segments``); the
  ``Frame{i}:`` text stays.

Attention: per tile, the [CLS] query's attention to each patch at the tower's last layer vLLM builds -- the
feature layer: the chat format builds the tower only up to ``select_layer``, the HF format always uses its last
layer -- averaged over heads (:class:`~textscythe_vllm.probes.InternClsAttentionProbe`). It is laid out *after*
the pixel shuffle: each token's score is the mean of the scores of the 4 patches shuffled into it, found by running
vLLM's own ``pixel_shuffle`` on patch indices (:func:`shuffle_index_map`), so ``ps_version`` v1 and v2 both come
out as vLLM packs the features. (The patch-level [CLS] map, as FasterVLM reads it, does not line up with
InternVL's tokens.)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME, _vllm, explain
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    EmbeddingItems,
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
    InternVLChatModel,
    InternVLDummyInputsBuilder,
    InternVLMultiModalProcessor,
    InternVLProcessingInfo,
)
from textscythe_vllm.probes import InternClsAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel

logger = logging.getLogger(LOGGER_NAME)

MODALITIES = ("image", "video")


def shuffle_index_map(pixel_shuffle: Any, side: int, downsample_ratio: float) -> Tensor:
    """LongTensor ``[T, k]``: for each token of one tile after the pixel shuffle, the raster indices
    (``row * side + col``) of the ``k`` patches packed into it. ``pixel_shuffle`` is vLLM's own (a bound
    ``pixel_shuffle`` method), run on a one-channel "feature map" of patch indices -- so the map is the one the
    features were packed with, whatever the ``ps_version``."""
    indices = torch.arange(side * side, dtype=torch.float64).reshape(1, side, side, 1)  # [1, h, w, 1]
    shuffled = pixel_shuffle(indices, scale_factor=downsample_ratio)  # [1, h', w', k]
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def token_attention(patch_attention: Tensor, index_map: Tensor) -> Tensor:
    """``[tiles, P]`` per-patch scores ([CLS] column dropped) -> ``[tiles, T]`` per-token scores: the mean over
    the patches each token packs (``index_map``: :func:`shuffle_index_map`)."""
    return patch_attention[:, index_map.to(patch_attention.device)].mean(dim=-1)


def _tile_counts(modality_input: Any) -> list[int]:
    return [int(count) for count in modality_input["num_patches"]]


class _InternVLPruning(PruningModel):
    """What both formats share: item counts, the probe's scores laid out per token, frames as segments."""

    pruned_modalities = MODALITIES
    cls_attention: InternClsAttentionProbe | None = None

    def _shuffle_map(self) -> Tensor:
        side = round(self.patch_tokens**0.5)  # patches per tile side
        return shuffle_index_map(self.pixel_shuffle, side, self.downsample_ratio)

    def count_items(self, modality: str, modality_input: Any) -> int:
        key = "data" if modality_input["type"].endswith("embeds") else "num_patches"
        return len(modality_input[key])

    def stock_features(self, modality: str, modality_input: Any) -> list[Tensor]:
        return list(_vllm.vision_features(self, modality_input))

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        if modality_input["type"].endswith("embeds"):  # precomputed rows: no layout, no attention
            features = self.stock_features(modality, modality_input)
            return EncodedItems(features, [None] * len(features))
        probe = self.cls_attention if with_attention else None
        scores, seconds = None, 0.0  # [all tiles of the batch, T]
        if probe is None:
            features = self.stock_features(modality, modality_input)
        else:
            with probe.capture() as captured:
                features = self.stock_features(modality, modality_input)
            if captured:
                # [CLS] is column 0 of the tower's output, dropped before the shuffle (extract_feature)
                scores, seconds = token_attention(captured[-1][:, 1:], self._shuffle_map()), probe.seconds
            else:
                logger.warning("textscythe: the InternViT attention probe saw no forward pass; selecting without it")
        per_tile = self.num_image_token
        side = round(per_tile**0.5)  # tokens per tile side
        tiles = _tile_counts(modality_input)
        encoded = EncodedItems(features, [], None, [] if with_layouts else None, seconds,
                               [[per_tile] * count for count in tiles] if modality == "video" else None)
        offset = 0
        for index, count in enumerate(tiles):
            # A layout that disagreed with the features would fail inside the guarded selection and take its
            # fallback (choose_rows), never the engine.
            item_scores = None if scores is None else scores[offset:offset + count].reshape(-1)
            encoded.attention.append(None if item_scores is None else item_scores.to(features[index].device))
            if encoded.layouts is not None:
                encoded.layouts.append(explain.patch_grid(side, side, count, region="whole") if modality == "video"
                                       else explain.views_layout(list(range(count * per_tile)), count, side))
            offset += count
        return encoded


class _InternVLProcessorPruning(PruningProcessorMixin):
    """Processor glue both formats share: items counted per image / video (not per tile), video tokens."""

    def _num_processed_items(self, processed_data: Any, modality: str = "image") -> int:
        for key in (f"{modality}_num_patches", f"{modality}_embeds"):
            value = processed_data.get(key)
            if value is not None:
                return len(value)
        return 0

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if modality == "image":
            return super()._unpruned_token_count(items, index, modality)
        if isinstance(items, EmbeddingItems):
            return items.get_feature_size(index)
        # one tile per frame
        return items.get_num_frames(index) * self.info.get_hf_processor().image_seq_length


# -- chat format ------------------------------------------------------------------------------------------------
class TextScytheInternVLChatMultiModalProcessor(_InternVLProcessorPruning, InternVLMultiModalProcessor):
    @property
    def pruned_modalities(self) -> tuple[str, ...]:  # type: ignore[override]
        # vLLM enables videos only for an LLM whose vocabulary has a video context token
        return MODALITIES if self.info.ctx_video_token else ("image",)

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        return [self.info.get_tokenizer().convert_tokens_to_ids(f"<{modality}>")]

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if modality == "video" or isinstance(items, EmbeddingItems):
            return super()._unpruned_token_count(items, index, modality)
        size = items.get_image_size(index)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height,
                                              processor=self.info.get_hf_processor())


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheInternVLChatMultiModalProcessor,
    info=with_plugin_context(InternVLProcessingInfo),
    dummy_inputs=InternVLDummyInputsBuilder,
)
class TextScytheInternVLChatModel(_InternVLPruning, InternVLChatModel):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Under the encoder's data parallelism each rank sees a shard of the tiles: no probe (no attention).
        if not self.use_data_parallel:
            attention = self.vision_model.encoder.layers[-1].attn
            self.cls_attention = InternClsAttentionProbe(
                attention.attn, local_heads=attention.num_heads_per_partition, head_dim=attention.head_dim,
                total_heads=attention.num_heads, tp_size=attention.tp_size, tp_rank=attention.tp_rank,
            )

    def get_encoder_cudagraph_config(self) -> Any:
        # Captured encoder graphs bypass embed_multimodal (no pruning: more rows than placeholders).
        return replace(super().get_encoder_cudagraph_config(), modalities=[])


# -- HF format --------------------------------------------------------------------------------------------------
class TextScytheInternVLMultiModalProcessor(_InternVLProcessorPruning, InternS1MultiModalProcessor):
    pruned_modalities = MODALITIES

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        processor = self.info.get_hf_processor()
        token = processor.image_token if modality == "image" else processor.video_token
        return [self.info.get_tokenizer().convert_tokens_to_ids(token)]

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if modality == "video" or isinstance(items, EmbeddingItems):
            return super()._unpruned_token_count(items, index, modality)
        size = items.get_image_size(index)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height,
                                              processor=self.info.get_hf_processor(), mm_kwargs={})


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheInternVLMultiModalProcessor,
    info=with_plugin_context(InternS1ProcessingInfo),
    dummy_inputs=InternS1DummyInputsBuilder,
)
class TextScytheInternVLForConditionalGeneration(_InternVLPruning, InternS1ForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.patch_tokens = (self.config.vision_config.image_size[0] // self.patch_size) ** 2
        attention = self.vision_tower.encoder.layer[-1].attention  # no tensor parallelism in this tower
        self.cls_attention = InternClsAttentionProbe(
            attention.attn, local_heads=attention.num_heads, head_dim=attention.head_dim,
            total_heads=attention.num_heads,
        )
