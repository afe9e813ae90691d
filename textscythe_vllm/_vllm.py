"""The one home of everything the plugin reaches inside vLLM.

Every vLLM module below the top-level package, and every private (underscore) name of the vLLM classes the plugin
extends, is reached from here only -- through a named re-export, a wrapper function or :class:`ProcessorHooks` --
so a vLLM upgrade is a one-file job: check this file against the new release. ``tests/test_vllm_boundary.py``
enforces it (it reads the private names off the installed vLLM's own source).

* the supported series (0.32, 0.33) and the one refusal for any other (:func:`check_vllm_version`);
* re-exports, imported lazily on first use (``register()`` runs in every vLLM process and must stay cheap);
* wrappers for the private model methods the families call (:func:`parse_multimodal_inputs`, ...);
* :class:`ProcessorHooks`, the private ``BaseMultiModalProcessor`` steps the plugin extends, each handed to a
  public hook of :class:`textscythe_vllm.processing.PruningProcessorMixin`;
* what the API server's app knows (API keys, the served model), read by the middleware.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

#: The vLLM minor series whose private multimodal processor and model APIs the plugin is written against: 0.32 is
#: tested on CPU in CI; every module the plugin subclasses is byte-identical in 0.33.0 (no CPU wheel of 0.33 exists
#: to run it; docs/operations.md, "vLLM versions").
SUPPORTED_VLLM_SERIES = ("0.32", "0.33")
#: Test hook (tests/test_reliability.py): when set, the version check sees this version instead of the installed
#: one, so the refusal path of a real ``vllm serve`` start-up can be exercised without another vLLM.
VERSION_OVERRIDE_ENV = "TEXTSCYTHE_VLLM_VERSION_OVERRIDE"
#: The pip requirement that matches :data:`SUPPORTED_VLLM_SERIES` (also in pyproject.toml).
VLLM_REQUIREMENT = "vllm>=0.32,<0.34"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Refuse to patch a vLLM whose private processor/model APIs the plugin was not written against."""
    version = os.environ.get(VERSION_OVERRIDE_ENV) or version
    release = version.split("+", 1)[0]
    if ".".join(release.split(".")[:2]) not in SUPPORTED_VLLM_SERIES:
        series = " and ".join(f"{minor}.x" for minor in SUPPORTED_VLLM_SERIES)
        raise UnsupportedVLLMVersion(
            f"textscythe-vllm supports vLLM {series} only (it overrides private multimodal processor and model "
            f"APIs of those series), but vLLM {version} is installed. Install '{VLLM_REQUIREMENT}', or disable "
            f"the plugin with VLLM_PLUGINS= (empty) to run stock vLLM."
        )


# --- what the API server's app knows (read by the middleware) ----------------------------------------------
def api_key_check(app: object) -> Callable[[Mapping[str, Any]], bool] | None:
    """vLLM's own API-key check (``AuthenticationMiddleware.verify_token``: ``Authorization: Bearer <key>``,
    compared in constant time) for the keys the app's middleware was installed with (``--api-key`` or
    ``VLLM_API_KEY``), as a function of an ASGI scope; ``None`` when the server has no key."""
    authentication = __getattr__("AuthenticationMiddleware")
    for middleware in getattr(app, "user_middleware", ()):
        if middleware.cls is authentication:
            tokens = [token for token in middleware.kwargs.get("tokens", ()) if token]
            if tokens:
                from starlette.datastructures import Headers

                checker = authentication(app=None, tokens=tokens)
                return lambda scope: bool(checker.verify_token(Headers(scope=scope)))
    return None


def served_model(app: object) -> tuple[str, str] | None:
    """``(served model name, architecture vLLM resolved)`` of the API server's app, or ``None`` before the app's
    state is set up. The architecture is the *resolved* one: ``--model-impl transformers`` reports the
    Transformers backend class, not the checkpoint's architecture."""
    config = getattr(getattr(app, "state", None), "vllm_config", None)
    if config is None:
        return None
    model_config = config.model_config
    return str(model_config.served_model_name), str(model_config.architecture)


# --- re-exports (lazy) -----------------------------------------------------------------------------------------
_MODELS = "vllm.model_executor.models"
_LAZY: dict[str, tuple[str, str]] = {
    # name here: (module, name there)
    "MULTIMODAL_REGISTRY": ("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    "InputProcessingContext": ("vllm.multimodal.processing", "InputProcessingContext"),
    "MultiModalHasher": ("vllm.multimodal.hasher", "MultiModalHasher"),
    "MultiModalFieldConfig": ("vllm.multimodal.inputs", "MultiModalFieldConfig"),
    "ImageEmbeddingItems": ("vllm.multimodal.parse", "ImageEmbeddingItems"),
    "EmbeddingItems": ("vllm.multimodal.parse", "EmbeddingItems"),
    "tensor_model_parallel_all_reduce": ("vllm.distributed", "tensor_model_parallel_all_reduce"),
    "StatLoggerBase": ("vllm.v1.metrics.loggers", "StatLoggerBase"),
    "AuthenticationMiddleware": ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware"),
    "CLIPVisionModel": (f"{_MODELS}.clip", "CLIPVisionModel"),
    "SiglipVisionModel": (f"{_MODELS}.siglip", "SiglipVisionModel"),
    # LLaVA-1.5 (and the Pixtral-HF checkpoints vLLM serves with the same class)
    "LlavaDummyInputsBuilder": (f"{_MODELS}.llava", "LlavaDummyInputsBuilder"),
    "LlavaForConditionalGeneration": (f"{_MODELS}.llava", "LlavaForConditionalGeneration"),
    "LlavaMultiModalProcessor": (f"{_MODELS}.llava", "LlavaMultiModalProcessor"),
    "LlavaProcessingInfo": (f"{_MODELS}.llava", "LlavaProcessingInfo"),
    "build_llava_or_pixtral_info": (f"{_MODELS}.llava", "_build_llava_or_pixtral_hf_info"),
    "build_llava_or_pixtral_processor": (f"{_MODELS}.llava", "_build_llava_or_pixtral_hf_processor"),
    # LLaVA-NeXT
    "LlavaNextForConditionalGeneration": (f"{_MODELS}.llava_next", "LlavaNextForConditionalGeneration"),
    "LlavaNextMultiModalProcessor": (f"{_MODELS}.llava_next", "LlavaNextMultiModalProcessor"),
    "LlavaNextProcessingInfo": (f"{_MODELS}.llava_next", "LlavaNextProcessingInfo"),
    "get_anyres_image_grid_shape": (f"{_MODELS}.llava_next", "get_anyres_image_grid_shape"),
    # LLaVA-OneVision
    "LlavaOnevisionDummyInputsBuilder": (f"{_MODELS}.llava_onevision", "LlavaOnevisionDummyInputsBuilder"),
    "LlavaOnevisionForConditionalGeneration": (f"{_MODELS}.llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "LlavaOnevisionMultiModalProcessor": (f"{_MODELS}.llava_onevision", "LlavaOnevisionMultiModalProcessor"),
    "LlavaOnevisionProcessingInfo": (f"{_MODELS}.llava_onevision", "LlavaOnevisionProcessingInfo"),
    # Qwen2.5-VL
    "Qwen2_5_VLDummyInputsBuilder": (f"{_MODELS}.qwen2_5_vl", "Qwen2_5_VLDummyInputsBuilder"),
    "Qwen2_5_VLForConditionalGeneration": (f"{_MODELS}.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Qwen2_5_VLMultiModalProcessor": (f"{_MODELS}.qwen2_5_vl", "Qwen2_5_VLMultiModalProcessor"),
    "Qwen2_5_VLProcessingInfo": (f"{_MODELS}.qwen2_5_vl", "Qwen2_5_VLProcessingInfo"),
    # Qwen3-VL (dense, MoE) and Qwen3.5 (dense, MoE): one processor class, one info class per architecture
    "Qwen3VLDummyInputsBuilder": (f"{_MODELS}.qwen3_vl", "Qwen3VLDummyInputsBuilder"),
    "Qwen3VLMultiModalProcessor": (f"{_MODELS}.qwen3_vl", "Qwen3VLMultiModalProcessor"),
    "Qwen3VLForConditionalGeneration": (f"{_MODELS}.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLProcessingInfo": (f"{_MODELS}.qwen3_vl", "Qwen3VLProcessingInfo"),
    "Qwen3VLMoeForConditionalGeneration": (f"{_MODELS}.qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    "Qwen3VLMoeProcessingInfo": (f"{_MODELS}.qwen3_vl_moe", "Qwen3VLMoeProcessingInfo"),
    "Qwen3_5ForConditionalGeneration": (f"{_MODELS}.qwen3_5", "Qwen3_5ForConditionalGeneration"),
    "Qwen3_5ProcessingInfo": (f"{_MODELS}.qwen3_5", "Qwen3_5ProcessingInfo"),
    "Qwen3_5MoeForConditionalGeneration": (f"{_MODELS}.qwen3_5", "Qwen3_5MoeForConditionalGeneration"),
    "Qwen3_5MoeProcessingInfo": (f"{_MODELS}.qwen3_5", "Qwen3_5MoeProcessingInfo"),
    # Gemma 4
    "Gemma4DummyInputsBuilder": (f"{_MODELS}.gemma4_mm", "Gemma4DummyInputsBuilder"),
    "Gemma4ForConditionalGeneration": (f"{_MODELS}.gemma4_mm", "Gemma4ForConditionalGeneration"),
    "Gemma4MultiModalProcessor": (f"{_MODELS}.gemma4_mm", "Gemma4MultiModalProcessor"),
    "Gemma4ProcessingInfo": (f"{_MODELS}.gemma4_mm", "Gemma4ProcessingInfo"),
    "GEMMA4_SUPPORTED_SOFT_TOKENS": (f"{_MODELS}.gemma4_mm", "_SUPPORTED_SOFT_TOKENS"),
    "GEMMA4_VIDEO_SOFT_TOKENS": (f"{_MODELS}.gemma4_mm", "_VIDEO_MAX_SOFT_TOKENS"),
    "gemma4_configured_soft_tokens": (f"{_MODELS}.gemma4_mm", "_get_max_soft_tokens"),
    # InternVL: the chat format (InternVLChatModel) and the HF format (InternVLForConditionalGeneration, which vLLM
    # serves with InternS1's classes)
    "InternVLChatModel": (f"{_MODELS}.internvl", "InternVLChatModel"),
    "InternVLDummyInputsBuilder": (f"{_MODELS}.internvl", "InternVLDummyInputsBuilder"),
    "InternVLMultiModalProcessor": (f"{_MODELS}.internvl", "InternVLMultiModalProcessor"),
    "InternVLProcessingInfo": (f"{_MODELS}.internvl", "InternVLProcessingInfo"),
    "InternS1DummyInputsBuilder": (f"{_MODELS}.interns1", "InternS1DummyInputsBuilder"),
    "InternS1ForConditionalGeneration": (f"{_MODELS}.interns1", "InternS1ForConditionalGeneration"),
    "InternS1MultiModalProcessor": (f"{_MODELS}.interns1", "InternS1MultiModalProcessor"),
    "InternS1ProcessingInfo": (f"{_MODELS}.interns1", "InternS1ProcessingInfo"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


# --- private model methods the families call -------------------------------------------------------------------
def parse_multimodal_inputs(model: Any, **kwargs: object) -> dict[str, Any]:
    """The model's own parsing of ``embed_multimodal``'s kwargs into ``{modality: parsed input}`` (in kwargs
    order); image-only models (LLaVA, LLaVA-NeXT) parse their one modality."""
    parse = getattr(model, "_parse_and_validate_multimodal_inputs", None)
    if parse is None:
        return {"image": model._parse_and_validate_image_input(**kwargs)}
    # InternVL's parsing names its modalities "images" / "videos"
    return {_PARSED_MODALITY.get(key, key): value for key, value in parse(**kwargs).items()}


_PARSED_MODALITY = {"images": "image", "videos": "video"}


def image_features(model: Any, image_input: Any) -> Any:
    """The model's tower + projector on parsed image input: one ``[rows, D]`` tensor per image."""
    return model._process_image_input(image_input)


def video_features(model: Any, video_input: Any) -> Any:
    """The same for parsed video input (``_process_video_input`` or, in LLaVA-OneVision, ``_process_video_pixels``)."""
    process = getattr(model, "_process_video_input", None) or model._process_video_pixels
    return process(video_input)


def vision_features(model: Any, parsed_input: Any) -> Any:
    """InternVL's tower + pixel shuffle + projector on parsed image or video input (``_process_vision_input``):
    one ``[tiles * tokens_per_tile, D]`` tensor per image, ``[frames * tokens_per_tile, D]`` per video."""
    return model._process_vision_input(parsed_input)


def gemma4_num_soft_tokens(info: Any, width: int, height: int, max_soft_tokens: int | None) -> int:
    """Gemma 4's soft tokens for one image or frame of ``width`` x ``height`` px (``_compute_num_soft_tokens``: the
    count stock vLLM gives its placeholders); ``None``: the checkpoint's default budget."""
    return info._compute_num_soft_tokens(width, height, max_soft_tokens=max_soft_tokens)


def qwen3_vl_frame_runs(model_class: type, input_tokens: list[int], mm_features: list[Any], config: Any) -> Any:
    """Qwen3-VL's own walk over a prompt's items: per image, and per frame of a video (frames sit between
    timestamp text), ``(offset of its first placeholder, grid h, grid w, placeholders in the prompt)``."""
    return model_class._iter_mm_grid_hw(
        input_tokens, mm_features, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        spatial_merge_size=config.vision_config.spatial_merge_size,
    )


def merge_image_patches(model_class: type, model: Any, image_size: Any, patch_embeddings: Any, strategy: str,
                        **options: Any) -> Any:
    """LLaVA-NeXT's / OneVision's own any-resolution merge (unpad, newline rows) of one image's view rows."""
    return model_class._merge_image_patch_embeddings(model, image_size, patch_embeddings, strategy=strategy, **options)


# --- the private processor steps the plugin extends ---------------------------------------------------------------
class ProcessorHooks:
    """vLLM's private ``BaseMultiModalProcessor`` steps the plugin extends. Each override hands the stock step
    (already called, or as a callable) to a public hook of the processor mixin, so the mixin names no private
    vLLM method. Put in front of vLLM's processor class (the mixin inherits it)."""

    def _get_mm_hashes(self, inputs: Any) -> Any:
        return self.item_hashes(inputs, super()._get_mm_hashes)  # type: ignore[attr-defined, misc]

    def _postprocess_hf_mm_data(self, mm_inputs: Any, hf_processor_mm_kwargs: Any, processed_data: Any) -> Any:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)  # type: ignore[misc]
        return self.add_plan_fields(processed)  # type: ignore[attr-defined]

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)  # type: ignore[misc]
        return self.add_plan_field_configs(fields)  # type: ignore[attr-defined]

    def _get_mm_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_mm_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        return self.pruned_prompt_updates(updates)  # type: ignore[attr-defined]

    def _get_cache_missing_processor_kwargs(self, inputs: Any, mm_is_cached: Mapping[str, list[bool]]) -> Any:
        self.note_items_processed(mm_is_cached)  # type: ignore[attr-defined]
        return super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached)  # type: ignore[misc]


StockStep = Callable[[Any], Any]
