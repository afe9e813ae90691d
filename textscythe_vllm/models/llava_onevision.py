"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) with TextScythe pruning of images and videos.

Visual tokens, as vLLM merges them:

* **image**: the base view (729 rows for a 384 px SigLIP tower) followed by the any-resolution tiles, un-padded
  to the image's aspect ratio, bilinearly down-sampled when they exceed 9 views' worth (``anyres_max_9``), with
  one ``image_newline`` row closing every tile row -- up to ~8,700 rows. The budget counts the whole image.
* **video**: each frame's 729 rows bilinearly pooled 2x (196 rows), frames in order, then one ``image_newline``
  row. The budget counts the whole video; the selector chooses jointly over all frames' rows (so frames the
  question points at may keep more tokens than others).

Newline rows carry no image content, so they are never chosen while content rows remain (``candidates``).

Attention (SigLIP has no [CLS]): for each token of a view (a base view, a tile, or a frame), the mean attention
it receives at the tower's feature layer -- the last layer vLLM builds -- averaged over heads and over the view's
729 queries (:class:`~textscythe_vllm.pruning.MeanAttentionProbe`, read from vLLM's own forward pass, backend
untouched). Each view's map is then laid out like the features: through vLLM's own merge (un-pad, bilinear
``anyres_max`` down-sampling, newline columns) for images, and vLLM's own 2x bilinear pooling for frames, so a
merged or pooled row's attention is the same interpolation of its sources' attention as its features are.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import LOGGER_NAME
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    EmbeddingItems,
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    merge_image_patches,
)
from textscythe_vllm.probes import tower_attention_probe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import ITEMS_KEY, EncodedItems, PruningModel, cls_free

logger = logging.getLogger(LOGGER_NAME)

MODALITIES = ("image", "video")


def image_layout(model: Any, image_size: Tensor, view_attention: Tensor) -> tuple[Tensor, Tensor]:
    """``(attention [M], is_content [M])`` of one image's merged rows, from its views' ``[views, N]`` attention.

    Runs vLLM's own ``_merge_image_patch_embeddings`` on a 2-channel "embedding" per token -- (attention, 1) --
    with a (0, 0) newline: the first channel comes out merged exactly as the features are (same un-padding, same
    bilinear down-sampling), the second is 1 on content rows and 0 on newline rows.
    """
    values = torch.stack([view_attention.float(), torch.ones_like(view_attention, dtype=torch.float32)], dim=-1)
    newline = values.new_zeros(2)
    index_model = SimpleNamespace(config=model.config, image_newline=newline)
    merged = merge_image_patches(LlavaOnevisionForConditionalGeneration, index_model, image_size, values,
                                 "spatial_unpad", image_newline=newline)  # [M, 2]
    return merged[:, 0], merged[:, 1] > 0.5


def video_layout(model: Any, frame_attention: Tensor) -> tuple[Tensor, Tensor]:
    """``(attention [F * P + 1], is_content)`` of one video's rows from its frames' ``[F, N]`` attention: each
    frame's map pooled by vLLM's own ``apply_pooling`` (as the features are), then the trailing newline row."""
    pooled = LlavaOnevisionForConditionalGeneration.apply_pooling(
        model, frame_attention.float().unsqueeze(-1)  # [F, N, 1] -> [F, P, 1]
    ).reshape(-1)
    attention = torch.cat([pooled, pooled.new_zeros(1)])
    is_content = torch.ones_like(attention, dtype=torch.bool)
    is_content[-1] = False
    return attention, is_content


class TextScytheLlavaOnevisionMultiModalProcessor(PruningProcessorMixin, LlavaOnevisionMultiModalProcessor):
    pruned_modalities = MODALITIES

    def placeholder_token_ids(self, modality: str = "image") -> list[int]:
        config = self.info.get_hf_config()
        return [config.image_token_index if modality == "image" else config.video_token_index]

    def _num_processed_items(self, processed_data: Any, modality: str = "image") -> int:
        if modality == "image":
            return super()._num_processed_items(processed_data, modality)
        videos = processed_data.get("pixel_values_videos")
        return 0 if videos is None else len(videos)

    def _unpruned_token_count(self, items: Any, index: int, modality: str = "image") -> int:
        if modality == "image":
            return super()._unpruned_token_count(items, index, modality)
        if isinstance(items, EmbeddingItems):
            return items.get_feature_size(index)
        size = items.get_frame_size(index)
        return self.info.get_num_video_tokens(
            image_width=size.width, image_height=size.height, num_frames=items.get_num_frames(index)
        )


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheLlavaOnevisionMultiModalProcessor,
    info=with_plugin_context(LlavaOnevisionProcessingInfo),
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TextScytheLlavaOnevisionForConditionalGeneration(PruningModel, LlavaOnevisionForConditionalGeneration):
    pruned_modalities = MODALITIES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tower_attention = tower_attention_probe(self.vision_tower)

    def encode_items(self, modality: str, modality_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        if modality_input["type"] == "image_embeds":  # precomputed rows: no layout, no attention
            features = self.stock_features(modality, modality_input)
            return EncodedItems(features, [None] * len(features))
        probe = self.tower_attention if with_attention else None
        stacked, seconds = None, 0.0  # [views or frames of the whole batch, N]
        if probe is None:
            features = self.stock_features(modality, modality_input)
        else:
            with probe.capture() as captured:
                features = self.stock_features(modality, modality_input)
            # a CLIP tower's [CLS] column goes (OneVision checkpoints use SigLIP: "full")
            stacked, seconds = cls_free(self, captured[-1]), probe.seconds
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        encoded = EncodedItems(features, [], [], None, seconds)
        offset = 0
        for index, item_pixels in enumerate(modality_input[ITEMS_KEY[modality_input["type"]]]):
            views = item_pixels.shape[0]  # tiles (+ base view) of an image, frames of a video
            item_attention = stacked[offset:offset + views] if stacked is not None else torch.zeros(views, side * side)
            offset += views
            if modality == "image":
                sizes = modality_input.get("image_sizes")
                size = sizes[index] if sizes is not None else torch.tensor([self.config.vision_config.image_size] * 2)
                item_scores, is_content = image_layout(self, size, item_attention)
            else:
                item_scores, is_content = video_layout(self, item_attention)
            # A layout that disagreed with the features would fail inside the guarded selection and take its
            # fallback (choose_rows), never the engine.
            device = features[index].device
            encoded.attention.append(item_scores.to(device) if stacked is not None else None)
            encoded.candidates.append(is_content.to(device))  # type: ignore[union-attr]
        return encoded
