"""What is served and what it costs: the two 7B shapes, the analytic FLOP model and the scaling rule.

The FLOP model and the real 7B configurations live in :mod:`textscythe_dev.llava_7b_shape` (shared with the demo)
and are re-exported here; this module adds the benchmark's shapes (:data:`SHAPES`), the numbers of the served
checkpoint (:class:`Served`) and the depth cut: which CLIP depth keeps the real model's vision/LLM FLOP ratio
(:func:`served_configs`) and how far the served model is off it (:func:`scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textscythe_dev.llava_7b_shape import (
    REAL_TEXT,
    REAL_VISION,
    derive_vision_layers,
    request_flops,
    seven_b_configs,
    vision_flops,
    vision_llm_ratio,
)

__all__ = [
    "DEFAULT_LLM_LAYERS", "REAL_TEXT", "REAL_VISION", "REAL_VISION_LAYERS", "SHAPES", "Served",
    "derive_vision_layers", "expected_visual_tokens", "request_flops", "scaling", "served_configs",
    "served_from_config", "vision_flops", "vision_llm_ratio",
]

SHAPES: dict[str, dict[str, Any]] = {
    "llava-1.5": {"kind": "llava-1.5", "real": "LLaVA-1.5-7B", "image_px": 336, "budgets": [192, 128, 64],
                  "concurrency": [1, 4, 16], "rounds": 12, "out": "serving.json"},
    "llava-next": {"kind": "llava-next", "real": "LLaVA-NeXT-7B (v1.6, Vicuna-7B)", "image_px": 672,
                   "budgets": [320], "concurrency": [4], "rounds": 9, "out": "serving_next.json"},
}
DEFAULT_LLM_LAYERS = 3
REAL_VISION_LAYERS = 23  # CLIP layers vLLM runs for LLaVA (the feature layer is the penultimate of 24)


@dataclass
class Served:
    """What is served: the checkpoint directory and the numbers the analysis needs."""

    model_dir: Path
    text: dict[str, Any]
    vision: dict[str, Any]
    vision_layers: int
    views: int
    num_visual: int  # placeholder tokens of one unpruned image (N)
    text_tokens: int  # the image request's non-image prompt tokens (T)
    scaling: dict[str, Any] = field(default_factory=dict)


def expected_visual_tokens(shape: str) -> tuple[int, int]:
    """(N, views) of one image of the shape's size at the real widths: LLaVA-1.5 576 in 1 view; LLaVA-NeXT's
    672 x 672 image 5 views, 2,880 tokens + 48 newline rows = 2,928."""
    views = 1 if SHAPES[shape]["kind"] == "llava-1.5" else 5
    return (576 if views == 1 else 2928), views


def served_configs(shape: str, llm_layers: int, vision_layers: int | None,
                   text_tokens: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The depth-cut 7B configs (text, vision) and the CLIP layers run: ``vision_layers``, or unless given the
    count that keeps the real model's vision/LLM FLOP ratio at the full visual-token count."""
    num_visual, views = expected_visual_tokens(shape)
    if vision_layers is None:
        vision_layers = derive_vision_layers(llm_layers, text_tokens, num_visual, views)
    text_cfg, vision_cfg = seven_b_configs(llm_layers, vision_layers)
    return text_cfg, vision_cfg, vision_layers


def scaling(served: Served) -> dict[str, Any]:
    """How the depth-cut model's balance compares with the real model's (the report's ``config.scaling``)."""
    t, n, views = served.text_tokens, served.num_visual, served.views
    real = vision_llm_ratio(t, n, views, REAL_TEXT, REAL_VISION, REAL_VISION_LAYERS)
    ratio = vision_llm_ratio(t, n, views, served.text, served.vision, served.vision_layers)
    return {
        "llm_layers": served.text["num_hidden_layers"], "llm_layers_real": REAL_TEXT["num_hidden_layers"],
        "vision_layers_run": served.vision_layers, "vision_layers_run_real": REAL_VISION_LAYERS,
        "vision_to_llm_flops_real": real, "vision_to_llm_flops_served": ratio,
        "ratio_mismatch": ratio / real,  # 1 = the real model's balance; > 1: vision weighs more than in the real model
        "note": "vision side = CLIP tower + projector; LLM = prefill of T + N tokens; width, token counts, image "
                "sizes and the vocabulary-independent parts are the real model's, only depth is cut",
    }


def served_from_config(config: dict[str, Any]) -> Served:
    """What the FLOP model needs, from a report's ``config`` (for ``--reanalyse``)."""
    vision = dict(config["served_vision_config"])
    return Served(Path(), dict(config["served_text_config"]), vision, vision.pop("layers_run"), config["views"],
                  config["visual_tokens_N"], config["text_tokens_T"], config["scaling"])
