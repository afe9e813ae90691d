"""What is served and what it costs: the shapes (two 7B LLaVAs, Qwen3-VL-8B), the analytic FLOP models and the
scaling rule.

The LLaVA FLOP model and the real 7B configurations live in :mod:`textscythe_dev.llava_7b_shape` (shared with the
demo) and are re-exported here; Qwen3-VL-8B's in :mod:`textscythe_dev.qwen3_vl_8b_shape` (:func:`family` picks a
shape's). This module adds the benchmark's shapes (:data:`SHAPES`), the numbers of the served checkpoint
(:class:`Served`) and the depth cut: which tower depth keeps the real model's vision/LLM FLOP ratio
(:func:`served_configs`) and how far the served model is off it (:func:`scaling`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textscythe_dev import qwen3_vl_8b_shape as qwen3
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
    "DEFAULT_LLM_LAYERS", "REAL_TEXT", "REAL_VISION", "REAL_VISION_LAYERS", "SHAPES", "Family", "Served",
    "default_llm_layers", "derive_vision_layers", "expected_visual_tokens", "family", "is_qwen", "request_flops",
    "scaling", "served_configs", "served_from_config", "vision_flops", "vision_llm_ratio",
]

SHAPES: dict[str, dict[str, Any]] = {
    "llava-1.5": {"kind": "llava-1.5", "real": "LLaVA-1.5-7B", "image_px": 336, "budgets": [192, 128, 64],
                  "concurrency": [1, 4, 16], "rounds": 12, "out": "serving.json"},
    "llava-next": {"kind": "llava-next", "real": "LLaVA-NeXT-7B (v1.6, Vicuna-7B)", "image_px": 672,
                   "budgets": [320], "concurrency": [4], "rounds": 9, "out": "serving_next.json"},
    # 1024 x 1024 px: 1,024 visual tokens; budgets 25% and 10% of them. 6 of 36 LLM layers with 3 of 27 ViT blocks
    # (one per DeepStack level) keep the real vision/LLM FLOP ratio (0.98x).
    "qwen3-vl-8b": {"kind": "qwen3-vl", "real": "Qwen3-VL-8B-Instruct", "image_px": qwen3.IMAGE_PX,
                    "budgets": [256, 102], "concurrency": [4], "rounds": 8, "out": "serving_qwen3.json",
                    "llm_layers": 6},
}
DEFAULT_LLM_LAYERS = 3
REAL_VISION_LAYERS = 23  # CLIP layers vLLM runs for LLaVA (the feature layer is the penultimate of 24)


@dataclass(frozen=True)
class Family:
    """A shape family's real model and FLOP model (the functions share the LLaVA signatures)."""

    real_text: dict[str, Any]
    real_vision: dict[str, Any]
    real_vision_layers: int
    request_flops: Callable[..., dict[str, float]]
    vision_flops: Callable[..., dict[str, float]]
    vision_llm_ratio: Callable[..., float]
    tower: str  # the vision tower's name in the report
    size: str  # the real model's size in the report ("7B", "8B")
    vision_layer_range: tuple[int, int]  # the tower depths that can be served (inclusive)


LLAVA = Family(REAL_TEXT, REAL_VISION, REAL_VISION_LAYERS, request_flops, vision_flops, vision_llm_ratio, "CLIP",
               "7B", (1, REAL_VISION_LAYERS))
QWEN3_VL = Family(qwen3.REAL_TEXT, qwen3.REAL_VISION, qwen3.REAL_VISION_LAYERS, qwen3.request_flops,
                  qwen3.vision_flops, qwen3.vision_llm_ratio, "ViT", "8B",
                  (qwen3.MIN_VISION_LAYERS, qwen3.REAL_VISION_LAYERS))


def is_qwen(shape: str) -> bool:
    return SHAPES[shape]["kind"] == "qwen3-vl"


def family(shape: str) -> Family:
    """The real model and FLOP model of a shape (LLaVA-1.5 / -NeXT: :data:`LLAVA`; Qwen3-VL-8B: :data:`QWEN3_VL`)."""
    return QWEN3_VL if is_qwen(shape) else LLAVA


def default_llm_layers(shape: str) -> int:
    return SHAPES[shape].get("llm_layers", DEFAULT_LLM_LAYERS)


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
    shape: str = "llava-1.5"

    @property
    def family(self) -> Family:
        return family(self.shape)


def expected_visual_tokens(shape: str) -> tuple[int, int]:
    """(N, views) of one image of the shape's size at the real widths: LLaVA-1.5 576 in 1 view; LLaVA-NeXT's
    672 x 672 image 5 views, 2,880 tokens + 48 newline rows = 2,928; Qwen3-VL's 1024 x 1024 image 1,024 in 1."""
    if is_qwen(shape):
        return qwen3.visual_tokens({**qwen3.REAL_VISION, "image_size": SHAPES[shape]["image_px"]}), 1
    views = 1 if SHAPES[shape]["kind"] == "llava-1.5" else 5
    return (576 if views == 1 else 2928), views


def served_configs(shape: str, llm_layers: int, vision_layers: int | None,
                   text_tokens: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The depth-cut 7B / 8B configs (text, vision) and the tower layers run: ``vision_layers``, or unless given
    the count that keeps the real model's vision/LLM FLOP ratio at the full visual-token count."""
    num_visual, views = expected_visual_tokens(shape)
    if is_qwen(shape):
        if vision_layers is None:
            vision_layers = qwen3.derive_vision_layers(llm_layers, text_tokens, num_visual, views)
        text_cfg, vision_cfg = qwen3.eight_b_configs(llm_layers, vision_layers)
        return text_cfg, vision_cfg, vision_layers
    if vision_layers is None:
        vision_layers = derive_vision_layers(llm_layers, text_tokens, num_visual, views)
    text_cfg, vision_cfg = seven_b_configs(llm_layers, vision_layers)
    return text_cfg, vision_cfg, vision_layers


def scaling(served: Served) -> dict[str, Any]:
    """How the depth-cut model's balance compares with the real model's (the report's ``config.scaling``)."""
    t, n, views, fam = served.text_tokens, served.num_visual, served.views, served.family
    real = fam.vision_llm_ratio(t, n, views, fam.real_text, fam.real_vision, fam.real_vision_layers)
    ratio = fam.vision_llm_ratio(t, n, views, served.text, served.vision, served.vision_layers)
    result = {
        "llm_layers": served.text["num_hidden_layers"], "llm_layers_real": fam.real_text["num_hidden_layers"],
        "vision_layers_run": served.vision_layers, "vision_layers_run_real": fam.real_vision_layers,
        "vision_to_llm_flops_real": real, "vision_to_llm_flops_served": ratio,
        "ratio_mismatch": ratio / real,  # 1 = the real model's balance; > 1: vision weighs more than in the real model
        "note": "vision side = CLIP tower + projector; LLM = prefill of T + N tokens; width, token counts, image "
                "sizes and the vocabulary-independent parts are the real model's, only depth is cut",
    }
    if fam is QWEN3_VL:
        result["deepstack_visual_indexes"] = served.vision.get("deepstack_visual_indexes")
        result["deepstack_visual_indexes_real"] = fam.real_vision["deepstack_visual_indexes"]
        result["note"] = ("vision side = ViT (patch embedding + blocks) + the main and DeepStack mergers; LLM = "
                          "prefill of T + N tokens with the DeepStack adds; width, token counts, image size and the "
                          "vocabulary-independent parts are the real model's, only depth is cut (the DeepStack taps "
                          "mapped onto the cut tower)")
    return result


def served_from_config(config: dict[str, Any]) -> Served:
    """What the FLOP model needs, from a report's ``config`` (for ``--reanalyse``)."""
    vision = dict(config["served_vision_config"])
    return Served(Path(), dict(config["served_text_config"]), vision, vision.pop("layers_run"), config["views"],
                  config["visual_tokens_N"], config["text_tokens_T"], config["scaling"], config["shape"])
