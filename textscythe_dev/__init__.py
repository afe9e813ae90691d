"""Development kit, not shipped in the wheel: tiny local checkpoints that vLLM can serve on CPU without any
download, test servers and clients, probes, and the demo. ``scripts/setup_env.sh`` puts the repository on the
virtual environment's path (``textscythe-dev.pth``), so tests, benchmarks, the demo and vLLM's own worker
processes import it from the checkout.

Importing this package is cheap: the names below are loaded on first use, and the builders import
transformers/torch lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IMAGE_TOKEN", "KINDS", "build_tiny_llava", "build_tiny_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from textscythe_dev import tiny_models

        return getattr(tiny_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
