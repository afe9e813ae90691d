"""Read the plugin model's own values inside a vLLM worker (tests only).

``LLM.apply_model(functools.partial(probe_llava, items=...))`` pickles the callable by reference to the
worker process (set ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), so it has to live in an importable module.
"""

from __future__ import annotations

from typing import Any


def probe_llava(model: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each item (``pixel_values [1, 3, H, W]``, ``budget``, ``selector``, ``instruction`` ids), return

    * ``attention``: the [CLS] attention the plugin's probe reads off the tower (``[N]``, [CLS] column
      dropped for the "default" feature strategy, as ``embed_multimodal`` does);
    * ``features``: stock ``embed_multimodal`` rows (``[N, D]``, no plan);
    * ``rows``: ``embed_multimodal`` with the item's pruning plan (``[min(budget, N), D]``).

    Values are returned as nested lists of floats.
    """
    import torch

    from textscythe_vllm.processing import PLAN_FIELD, ItemPlan

    device = next(model.parameters()).device
    results = []
    with torch.inference_mode():
        for item in items:
            pixel_values = item["pixel_values"].to(device)
            with model.cls_attention.capture() as captured:
                features = model.embed_multimodal(pixel_values=pixel_values)
            attention = captured[-1][0]
            if model.config.vision_feature_select_strategy == "default":
                attention = attention[1:]
            plan = ItemPlan(budget=int(item["budget"]), selector=item["selector"],
                             instruction=tuple(int(t) for t in item["instruction"]))
            rows = model.embed_multimodal(pixel_values=pixel_values, **{PLAN_FIELD: [plan.encode()]})
            results.append({
                "attention": attention.float().cpu().tolist(),
                "features": features[0].float().cpu().tolist(),
                "rows": rows[0].float().cpu().tolist(),
            })
    return results


def probe_tower_attention(model: Any, pixel_values: Any) -> list[list[float]]:
    """The per-view attention the plugin's tower probe reads (``[views, S]``) for stacked views ``[V, 3, H, W]``,
    running the model's own vision tower (tests of the SigLIP mean-attention probe)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode(), model.tower_attention.capture() as captured:
        model.vision_tower(pixel_values.to(device), feature_select_strategy=model.config.vision_feature_select_strategy)
    return captured[-1].float().cpu().tolist()
