"""vLLM ``general_plugins`` entry point: swap in the pruning model classes.

vLLM runs ``register()`` in every process it starts (API server, engine core, workers), so it is idempotent
and cheap: it registers lazy ``"module:Class"`` strings and imports nothing heavy.
"""

from __future__ import annotations

import logging

from textscythe_vllm import LOGGER_NAME
from textscythe_vllm._vllm import UnsupportedVLLMVersion, check_vllm_version

logger = logging.getLogger(LOGGER_NAME)

#: vLLM architecture name -> our subclass (lazy import path).
MODEL_CLASSES = {
    "LlavaForConditionalGeneration": "textscythe_vllm.models.llava:TextScytheLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration":
        "textscythe_vllm.models.llava_next:TextScytheLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration":
        "textscythe_vllm.models.qwen2_5_vl:TextScytheQwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration":
        "textscythe_vllm.models.llava_onevision:TextScytheLlavaOnevisionForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "textscythe_vllm.models.qwen3_vl:TextScytheQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration":
        "textscythe_vllm.models.qwen3_vl:TextScytheQwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration": "textscythe_vllm.models.qwen3_vl:TextScytheQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration":
        "textscythe_vllm.models.qwen3_vl:TextScytheQwen3_5MoeForConditionalGeneration",
    "Gemma4ForConditionalGeneration": "textscythe_vllm.models.gemma4:TextScytheGemma4ForConditionalGeneration",
    "InternVLChatModel": "textscythe_vllm.models.internvl:TextScytheInternVLChatModel",
    "InternVLForConditionalGeneration": "textscythe_vllm.models.internvl:TextScytheInternVLForConditionalGeneration",
}
#: Per architecture: the model's own ``mm_processor_kwargs`` a request may set; the HTTP middleware lets these
#: through and the model's processor validates them (``request_processor_options``), every other key is dropped.
REQUEST_PROCESSOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "Gemma4ForConditionalGeneration": ("max_soft_tokens",),
}

_registered = False


def plugin_registered() -> bool:
    """Whether ``register()`` ran in this process (``VLLM_PLUGINS`` may leave the plugin out)."""
    return _registered


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    try:
        check_vllm_version(vllm.__version__)
    except UnsupportedVLLMVersion as error:
        # One clear line at start-up instead of a traceback (vLLM calls register() outside any handler):
        # SystemExit prints its message to stderr once and exits with status 1. (No logger call as well: it
        # printed the same message a second time.)
        raise SystemExit(str(error)) from None
    from textscythe_vllm import explain, metrics

    metrics.setup_process()
    explain.setup_process()
    for architecture, class_path in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, class_path)
    _registered = True
    logger.info("textscythe: visual token pruning enabled for %s", ", ".join(MODEL_CLASSES))
