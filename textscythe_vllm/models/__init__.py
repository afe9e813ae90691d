"""vLLM model classes with TextScythe pruning, one module per model family.

Each module subclasses vLLM's own model and processor and changes only ``embed_multimodal`` (which rows are
returned) and the processor (how many placeholders each image gets); see :mod:`textscythe_vllm.processing`
and :mod:`textscythe_vllm.pruning`.
"""
