"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres) with TextScythe pruning.

An image's visual tokens are the rows vLLM merges from the base view and the anyres tiles -- up to 2,880 for
a 7B LLaVA-v1.6, including one ``image_newline`` row per tile row. The budget counts the whole image (base +
tiles). Newline rows carry no image content and mark a 2-D layout that pruning dissolves, so they are never
chosen while image rows remain (``candidates``); the budget is spent on image rows only. Attention: each
view's [CLS] attention, laid out in the merged order by running vLLM's own merge on row indices.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from textscythe_vllm import explain
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    merge_image_patches,
)
from textscythe_vllm.probes import ClsAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel, cls_free


def anyres_layout(config: Any, image_size: Tensor, num_views: int) -> Tensor:
    """LongTensor ``[M]``: for each merged row of one image, its index in the stacked ``[views * N_view]`` tower
    rows, or -1 for a newline row. Runs vLLM's own ``_merge_image_patch_embeddings`` on row indices, so the
    layout is exactly the one the features were merged with."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows = torch.arange(num_views * side * side, dtype=torch.float64).reshape(num_views, side * side, 1)
    index_model = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
    merged = merge_image_patches(LlavaNextForConditionalGeneration, index_model, image_size, rows, "spatial_unpad")
    return merged[:, 0].round().long()


class TextScytheLlavaNextMultiModalProcessor(PruningProcessorMixin, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    TextScytheLlavaNextMultiModalProcessor,
    info=with_plugin_context(LlavaNextProcessingInfo),
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TextScytheLlavaNextForConditionalGeneration(PruningModel, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.cls_attention = ClsAttentionProbe.for_clip_tower(self.vision_tower)

    def encode_items(self, modality: str, image_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        if image_input["type"] != "pixel_values":  # precomputed rows: no layout, no attention
            features = self.stock_features(modality, image_input)
            return EncodedItems(features, [None] * len(features))
        probe = self.cls_attention if with_attention else None
        stacked, seconds = None, 0.0  # [sum(views), N] per-view attention
        if probe is None:
            features = self.stock_features(modality, image_input)
        else:
            with probe.capture() as captured:
                features = self.stock_features(modality, image_input)
            stacked, seconds = cls_free(self, captured[-1]), probe.seconds
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        encoded = EncodedItems(features, [], [], [] if with_layouts else None, seconds)
        offset = 0
        for index, views in enumerate(view.shape[0] for view in image_input["pixel_values"]):
            layout = anyres_layout(self.config, image_input["image_sizes"][index], views).to(features[index].device)
            encoded.candidates.append(layout >= 0)  # type: ignore[union-attr]
            if encoded.layouts is not None:
                encoded.layouts.append(explain.views_layout(layout.tolist(), views, side))
            if stacked is None:
                encoded.attention.append(None)
            else:
                flat = stacked[offset:offset + views].reshape(-1)
                encoded.attention.append(torch.where(layout >= 0, flat[layout.clamp(min=0)], 0.0))
            offset += views
        return encoded
