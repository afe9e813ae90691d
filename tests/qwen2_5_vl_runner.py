"""Run one vLLM configuration of the tiny Qwen2.5-VL offline (``vllm.LLM``) from a JSON spec; write JSON results.

Like ``tests/offline_runner.py`` (one fresh subprocess per configuration: plugin or stock ``VLLM_PLUGINS=``), with
videos and engine options for chunked prefill. Spec::

    {
      "model": "/path/to/checkpoint",
      "env": {"VLLM_PLUGINS": ""},
      "llm_kwargs": {"max_num_batched_tokens": 64},
      "requests": [
        {"id": "...", "prompt": "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...",
         "images": [{"seed": 1, "width": 336, "height": 224}],
         "videos": [{"seed": 2, "frames": 8, "width": 168, "height": 112}],
         "mm_processor_kwargs": {"visual_token_budget": 16}, "max_tokens": 8}
      ],
      "solo": true,
      "probe": "/path/to/items.pt",   # optional, torch.save'd [{"pixel_values", "grid_thw"}]; needs
                                      # VLLM_ALLOW_INSECURE_SERIALIZATION=1
      "output": "/path/to/results.json"
    }

Results: ``{"batch": [...], "solo": [...], "probe": [...], "timings": {...}}``; entries hold ``id``,
``prompt_token_ids``, ``token_ids`` (greedy, ``ignore_eos``) and ``logprobs`` of the generated tokens; probe entries
hold the plugin model's ``attention`` and ``features`` for the given pixels
(:func:`textscythe_vllm.testing.qwen_probe.probe_qwen2_5_vl`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def build_prompt(request: dict[str, Any]) -> dict[str, Any]:
    from textscythe_vllm.testing.images import scene
    from textscythe_vllm.testing.tiny_qwen import tiny_video

    prompt: dict[str, Any] = {"prompt": request["prompt"]}
    data: dict[str, Any] = {}
    if request.get("images"):
        data["image"] = [scene(int(i["seed"]), int(i["width"]), int(i["height"])) for i in request["images"]]
    if request.get("videos"):
        data["video"] = [
            tiny_video(int(v["seed"]), int(v["frames"]), int(v["width"]), int(v["height"])) for v in request["videos"]
        ]
    if data:
        prompt["multi_modal_data"] = data
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = dict(request["mm_processor_kwargs"])
    return prompt


def entries(requests: list[dict[str, Any]], outputs: list[Any]) -> list[dict[str, Any]]:
    result = []
    for request, output in zip(requests, outputs, strict=True):
        completion = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]
        result.append({
            "id": request["id"], "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(completion.token_ids), "logprobs": logprobs,
        })
    return result


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update({key: str(value) for key, value in spec.get("env", {}).items()})

    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm_kwargs = dict(
        model=spec["model"], enforce_eager=True, max_model_len=4096, seed=0, dtype="float32",
        enable_prefix_caching=False, limit_mm_per_prompt={"image": 2, "video": 2},
    )
    llm_kwargs.update(spec.get("llm_kwargs", {}))
    llm = LLM(**llm_kwargs)
    timings = {"start_s": time.monotonic() - started}
    requests = spec["requests"]

    def params(request: dict[str, Any]) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=int(request.get("max_tokens", 8)), ignore_eos=True,
                              logprobs=1)

    results: dict[str, Any] = {}
    started = time.monotonic()
    batch = llm.generate([build_prompt(r) for r in requests], [params(r) for r in requests], use_tqdm=False)
    results["batch"] = entries(requests, batch)
    timings["batch_s"] = time.monotonic() - started
    if spec.get("solo", True):
        started = time.monotonic()
        solo = [llm.generate([build_prompt(r)], [params(r)], use_tqdm=False)[0] for r in requests]
        results["solo"] = entries(requests, solo)
        timings["solo_s"] = time.monotonic() - started
    if spec.get("probe"):  # a torch.save'd list of {"pixel_values", "grid_thw"}: model-side attention/features
        import functools

        import torch

        from textscythe_vllm.testing.qwen_probe import probe_qwen2_5_vl

        items = torch.load(spec["probe"])
        (results["probe"],) = llm.apply_model(functools.partial(probe_qwen2_5_vl, items=items))
    results["timings"] = timings
    Path(spec["output"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/qwen2_5_vl_runner.py SPEC.json")
    raise SystemExit(main(sys.argv[1]))
