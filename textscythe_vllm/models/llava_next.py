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

from textscythe_vllm import explain, metrics
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    merge_image_patches,
)
from textscythe_vllm.processing import PLAN_FIELD, PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import ClsAttentionProbe, decode_plans, explaining, needs_attention, prune_items


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
class TextScytheLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.cls_attention = ClsAttentionProbe.for_clip_tower(self.vision_tower)
        metrics.setup_worker_metrics(vllm_config.model_config.served_model_name)

    def embed_multimodal(self, **kwargs: object) -> Any:
        packed = kwargs.pop(PLAN_FIELD, None)
        num_items = len(packed) if packed is not None else 0  # type: ignore[arg-type]
        plans = decode_plans(packed, num_items)
        pixel_values = kwargs.get("pixel_values")
        if plans is None or pixel_values is None:
            return super().embed_multimodal(**kwargs)
        views_per_item = [view.shape[0] for view in pixel_values]  # type: ignore[attr-defined]
        seconds = 0.0
        if self.cls_attention is None or not needs_attention(plans):
            features = super().embed_multimodal(**kwargs)
            stacked_attention = None
        else:
            with self.cls_attention.capture() as captured:
                features = super().embed_multimodal(**kwargs)
            stacked_attention, seconds = captured[-1], self.cls_attention.seconds  # [sum(views), S]
            if self.config.vision_feature_select_strategy == "default":
                stacked_attention = stacked_attention[:, 1:]
        image_sizes = kwargs.get("image_sizes")
        attention: list[Tensor | None] = []
        candidates: list[Tensor | None] = []
        layouts: list[dict[str, Any] | None] | None = [] if explaining(plans) else None
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        offset = 0
        for index, views in enumerate(views_per_item):
            layout = anyres_layout(self.config, image_sizes[index], views).to(features[index].device)  # type: ignore[index]
            candidates.append(layout >= 0)
            if layouts is not None:
                layouts.append(explain.views_layout(layout.tolist(), views, side))
            if stacked_attention is None:
                attention.append(None)
            else:
                flat = stacked_attention[offset:offset + views].reshape(-1)
                attention.append(torch.where(layout >= 0, flat[layout.clamp(min=0)], 0.0))
            offset += views
        embed_tokens = self.get_language_model().embed_input_ids
        return prune_items(list(features), attention, plans, embed_tokens, candidates, attention_seconds=seconds,
                           layouts=layouts)
