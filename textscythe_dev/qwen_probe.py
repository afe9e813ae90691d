"""Read the Qwen2.5-VL plugin model's own values inside a vLLM worker (tests only).

``LLM.apply_model(functools.partial(probe_qwen2_5_vl, items=...))`` pickles the callable by reference to the
worker process (set ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), so it lives in an importable module.
"""

from __future__ import annotations

from typing import Any


def probe_qwen2_5_vl(model: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each item (``pixel_values [P, C]`` normalised by the HF processor, ``raw_pixel_values`` the same
    without rescaling and normalisation, ``grid_thw [1, 3]``), run the vision tower as ``embed_multimodal`` does
    and return ``attention`` (the probe's per-row attention, raster order, ``[N]``) and ``features`` (the tower's
    rows, ``[N, D]``), as nested lists of floats. The raw values go in when the tower normalises on the device
    (vLLM's ``mm_device_do_normalize``, on by default), as the engine's processor then sends raw pixels."""
    import torch
    from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm

    from textscythe_vllm.models.qwen2_5_vl import merged_row_attention

    device = next(model.parameters()).device
    key = "pixel_values" if isinstance(model.visual.input_norm, IdentityInputNorm) else "raw_pixel_values"
    results = []
    with torch.inference_mode():
        for item in items:
            grid = [[int(v) for v in row] for row in item["grid_thw"].tolist()]
            segments = [h * w for t, h, w in grid for _ in range(t)]
            with model.attention_probe.capture_segments(segments) as captured:
                features = model.visual(item[key].to(device), grid_thw=grid)
            attention = merged_row_attention(model.visual, captured[-1], grid)[0]
            results.append({"attention": attention.float().cpu().tolist(), "features": features.float().cpu().tolist()})
    return results
