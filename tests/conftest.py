from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5-shaped tiny checkpoint (config/tokenizer/processor only: serve with --load-format dummy)."""
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-1.5"), kind="llava-1.5")


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-next"), kind="llava-next")


@pytest.fixture(scope="session")
def tiny_llava_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-1.5-shaped tiny checkpoint with real (random, seeded) weights, for HF-vs-vLLM equivalence."""
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-1.5-weights"), kind="llava-1.5", with_weights=True)
