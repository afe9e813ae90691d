"""The shape of LLaVA-1.5-7B / LLaVA-NeXT-7B, an analytic FLOP model of serving it, and depth-cut checkpoints of it.

Used by ``benchmarks/serving.py`` and the demo: width, token counts and image sizes are the real model's, so every
GEMM has the real shape; only the depth is cut, with the vision-tower depth chosen so the served model keeps the
real model's ratio of vision-side FLOPs to LLM-prefill FLOPs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: Vicuna-7B (LLaVA-1.5-7B's and LLaVA-v1.6-vicuna-7B's LLM) and CLIP ViT-L/14-336 (LLaVA's tower).
REAL_TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "head_dim": 128, "num_hidden_layers": 32, "vocab_size": 32000}
REAL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
               "image_size": 336, "patch_size": 14}
VISION_FEATURE_LAYER = -2  # LLaVA: the penultimate layer, so vLLM builds 23 of CLIP-L's 24 layers


def llm_prefill_flops(tokens: int, text: dict[str, Any]) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one prefill of ``tokens`` tokens: per layer the QKV/O and MLP GEMMs and
    causal attention (QK^T and AV over the lower triangle); logits for the last position only (vLLM computes
    no others). Norms, RoPE, activations and the embedding lookup are left out (< 1%)."""
    h, inter = text["hidden_size"], text["intermediate_size"]
    q_dim = text["num_attention_heads"] * text["head_dim"]
    kv_dim = text["num_key_value_heads"] * text["head_dim"]
    layers = text["num_hidden_layers"]
    gemm_per_token = 2 * (h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * inter)
    attention = 2 * 2 * q_dim * tokens * (tokens + 1) / 2
    return {"gemm": layers * tokens * gemm_per_token, "attention": layers * attention,
            "lm_head": 2 * h * text["vocab_size"]}


def vision_flops(views: int, vision: dict[str, Any], layers_run: int, llm_hidden: int) -> dict[str, float]:
    """FLOPs of the vision side for one image of ``views`` 336-px views: patch embedding, ``layers_run`` CLIP
    layers over 577 tokens (GEMMs + full attention), and LLaVA's projector (c -> D -> D) on the 576 patch rows
    of every view (LLaVA-NeXT's newline rows are parameters, not computed)."""
    c, inter = vision["hidden_size"], vision["intermediate_size"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    seq = patches + 1
    per_layer = 2 * seq * (4 * c * c + 2 * c * inter) + 2 * 2 * c * seq * seq
    patch_embed = 2 * patches * 3 * vision["patch_size"] ** 2 * c
    projector = 2 * views * patches * (c * llm_hidden + llm_hidden * llm_hidden)
    return {"tower": views * (layers_run * per_layer + patch_embed), "projector": projector}


def request_flops(text_tokens: int, visual_tokens: int, views: int, text: dict[str, Any], vision: dict[str, Any],
                  vision_layers: int) -> dict[str, float]:
    llm = llm_prefill_flops(text_tokens + visual_tokens, text)
    vis = vision_flops(views, vision, vision_layers, text["hidden_size"]) if views else {"tower": 0, "projector": 0}
    parts = {"vision_tower": vis["tower"], "projector": vis["projector"], "llm_gemm": llm["gemm"],
             "llm_attention": llm["attention"], "lm_head": llm["lm_head"]}
    return {**parts, "total": sum(parts.values())}


def vision_llm_ratio(text_tokens: int, num_visual: int, views: int, text: dict[str, Any], vision: dict[str, Any],
                     vision_layers: int) -> float:
    """(tower + projector) / LLM prefill FLOPs of an unpruned request."""
    flops = request_flops(text_tokens, num_visual, views, text, vision, vision_layers)
    return (flops["vision_tower"] + flops["projector"]) / (flops["total"] - flops["vision_tower"] - flops["projector"])


def derive_vision_layers(llm_layers: int, text_tokens: int, num_visual: int, views: int) -> int:
    """The CLIP-layer count (1..23) whose vision/LLM FLOP ratio is closest (in log) to the real model's."""
    real = vision_llm_ratio(text_tokens, num_visual, views, REAL_TEXT, REAL_VISION, 23)
    served_text = {**REAL_TEXT, "num_hidden_layers": llm_layers}
    return min(range(1, 24), key=lambda v: abs(math.log(
        vision_llm_ratio(text_tokens, num_visual, views, served_text, REAL_VISION, v) / real)))


def seven_b_configs(llm_layers: int, vision_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(text_config, vision_config)`` overrides for :func:`~textscythe_dev.tiny_models.build_tiny_llava`:
    Vicuna-7B's and CLIP-L's widths, ``llm_layers`` LLM layers and ``vision_layers`` CLIP layers run."""
    text = {k: REAL_TEXT[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                      "head_dim")}
    text["num_hidden_layers"] = llm_layers
    vision = {"hidden_size": REAL_VISION["hidden_size"], "intermediate_size": REAL_VISION["intermediate_size"],
              "num_attention_heads": REAL_VISION["num_attention_heads"], "projection_dim": 768,
              "num_hidden_layers": vision_layers - VISION_FEATURE_LAYER - 1}
    return text, vision


def build_seven_b_shaped(directory: Path, llm_layers: int, text_tokens: int, kind: str = "llava-1.5") -> Path:
    """A LLaVA-1.5-7B-shaped checkpoint (config only: serve with ``--load-format dummy``) with ``llm_layers`` LLM
    layers and the CLIP depth that keeps the real vision:LLM FLOP ratio for a ``text_tokens``-token question."""
    from textscythe_dev.tiny_models import build_tiny_llava

    views, num_visual = (1, 576) if kind == "llava-1.5" else (5, 2928)
    text, vision = seven_b_configs(llm_layers, derive_vision_layers(llm_layers, text_tokens, num_visual, views))
    return build_tiny_llava(directory, kind=kind, dtype="float32", text_config=text, vision_config=vision)
