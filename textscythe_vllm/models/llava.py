"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with TextScythe pruning.

Visual tokens: the projector's output, 576 rows for a 336px CLIP-L/14 image. Attention: the CLIP tower's
[CLS] attention at the feature layer (:class:`~textscythe_vllm.pruning.ClsAttentionProbe`). Pixtral-HF
checkpoints, which vLLM also serves with this class, keep the stock processor and are never pruned.
"""

from __future__ import annotations

from typing import Any

from textscythe_vllm import metrics
from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    build_llava_or_pixtral_info,
    build_llava_or_pixtral_processor,
)
from textscythe_vllm.processing import PLAN_FIELD, PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import ClsAttentionProbe, decode_plans, needs_attention, prune_items


class TextScytheLlavaMultiModalProcessor(PruningProcessorMixin, LlavaMultiModalProcessor):
    pass


def _build_processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, LlavaProcessingInfo):
        return TextScytheLlavaMultiModalProcessor(info, dummy_inputs)
    return build_llava_or_pixtral_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor,
    info=with_plugin_context(build_llava_or_pixtral_info),
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TextScytheLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.cls_attention = ClsAttentionProbe.for_clip_tower(self.vision_tower)
        metrics.setup_worker_metrics(vllm_config.model_config.served_model_name)

    def embed_multimodal(self, **kwargs: object) -> Any:
        packed = kwargs.pop(PLAN_FIELD, None)
        num_items = len(packed) if packed is not None else 0  # type: ignore[arg-type]
        plans = decode_plans(packed, num_items)
        if plans is None or ("pixel_values" not in kwargs and "image_embeds" not in kwargs):
            return super().embed_multimodal(**kwargs)
        if self.cls_attention is None or "pixel_values" not in kwargs or not needs_attention(plans):
            features, attention, seconds = super().embed_multimodal(**kwargs), [None] * num_items, 0.0
        else:
            with self.cls_attention.capture() as captured:
                features = super().embed_multimodal(**kwargs)
            # [B, S] -> [B, N]: drop the [CLS] column when the features drop the [CLS] row
            attention_rows = captured[-1]
            if self.config.vision_feature_select_strategy == "default":
                attention_rows = attention_rows[:, 1:]
            attention, seconds = list(attention_rows.unbind(0)), self.cls_attention.seconds
        embed_tokens = self.get_language_model().embed_input_ids
        return prune_items(list(features), attention, plans, embed_tokens, attention_seconds=seconds)
