"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with TextScythe pruning.

Visual tokens: the projector's output, 576 rows for a 336px CLIP-L/14 image. Attention: the CLIP tower's
[CLS] attention at the feature layer (:class:`~textscythe_vllm.probes.ClsAttentionProbe`). Pixtral-HF
checkpoints, which vLLM also serves with this class, keep the stock processor and are never pruned.
"""

from __future__ import annotations

from typing import Any

from textscythe_vllm._vllm import (
    MULTIMODAL_REGISTRY,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    build_llava_or_pixtral_info,
    build_llava_or_pixtral_processor,
)
from textscythe_vllm.probes import ClsAttentionProbe
from textscythe_vllm.processing import PruningProcessorMixin, with_plugin_context
from textscythe_vllm.pruning import EncodedItems, PruningModel, cls_free


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
class TextScytheLlavaForConditionalGeneration(PruningModel, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.cls_attention = ClsAttentionProbe.for_clip_tower(self.vision_tower)

    def encode_items(self, modality: str, image_input: Any, *, with_attention: bool,
                     with_layouts: bool) -> EncodedItems:
        if self.cls_attention is None or not with_attention or image_input["type"] != "pixel_values":
            features = self.stock_features(modality, image_input)
            return EncodedItems(features, [None] * len(features))
        with self.cls_attention.capture() as captured:
            features = self.stock_features(modality, image_input)
        attention = cls_free(self, captured[-1])  # [B, N]
        return EncodedItems(features, list(attention.unbind(0)), attention_seconds=self.cls_attention.seconds)
