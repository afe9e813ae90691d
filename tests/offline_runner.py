"""Run one vLLM configuration offline (``vllm.LLM``) from a JSON spec and write the results as JSON.

vLLM's offline engine spawns processes and its model registry / plugin state is process-global, so every
configuration the equivalence tests compare (with the plugin, stock vLLM with ``VLLM_PLUGINS=``) runs in
a fresh ``python tests/offline_runner.py SPEC.json`` subprocess. Spec::

    {
      "model": "/path/to/checkpoint",
      "env": {"VLLM_PLUGINS": ""},              # optional, applied before vLLM is imported
      "llm_kwargs": {...},                       # optional, extra ``vllm.LLM`` arguments
      "requests": [
        {"id": "q1-k64", "prompt": "USER: <image>\\n... ASSISTANT:",
         "images": [{"seed": 1, "width": 336, "height": 336}],
         "mm_processor_kwargs": {"visual_token_budget": 64, "visual_token_selector": "textscythe"},
         "max_tokens": 8}
      ],
      "solo": true,                              # also run every request on its own (default true)
      "probe": [                                 # optional: model-side values read inside the worker
        {"image": {"seed": 1}, "budget": 64, "selector": "textscythe", "instruction": [34, 9, ...]}
      ],
      "output": "/path/to/results.json"
    }

Results: ``{"batch": [...], "solo": [...], "probe": [...]}``; each generation entry holds ``id``,
``prompt_token_ids``, ``token_ids`` (greedy, ``ignore_eos``) and ``logprobs`` (the raw log-probability of each
generated token). The batch is ONE ``LLM.generate`` call with
every request; the solo runs are one call per request, after the batch. Prefix caching is off, so a solo run
recomputes the whole prompt (and the image embeddings) instead of replaying the batch's KV cache; the
multimodal processor cache keeps vLLM's default (on), so the solo runs take its cache-hit path.

A probe entry (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``: the probe function is pickled to the worker)
returns, for the image's pixel values from the checkpoint's HF image processor, what the plugin's model
computes in the worker: ``attention`` (the [CLS] attention the pruning reads, ``[N]``), ``features`` (stock
``embed_multimodal`` rows ``[N, D]``) and ``rows`` (``embed_multimodal`` with the entry's pruning plan).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def load_image(spec: dict[str, Any]) -> Any:
    from textscythe_vllm.testing.images import scene

    return scene(int(spec["seed"]), int(spec.get("width", 336)), int(spec.get("height", 336)))


def build_prompt(request: dict[str, Any]) -> dict[str, Any]:
    prompt: dict[str, Any] = {"prompt": request["prompt"]}
    images = [load_image(image) for image in request.get("images", [])]
    if images:
        prompt["multi_modal_data"] = {"image": images}
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = dict(request["mm_processor_kwargs"])
    return prompt


def sampled_logprobs(completion: Any) -> list[float]:
    """The raw log-probability of each generated token (``[]`` when logprobs were not requested)."""
    if completion.logprobs is None:
        return []
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]


def generation_entries(requests: list[dict[str, Any]], outputs: list[Any]) -> list[dict[str, Any]]:
    assert len(requests) == len(outputs)
    return [
        {
            "id": request["id"],
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "logprobs": sampled_logprobs(output.outputs[0]),
        }
        for request, output in zip(requests, outputs, strict=True)
    ]


def run_probe(llm: Any, model_dir: str, probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from transformers import AutoProcessor

    image_processor = AutoProcessor.from_pretrained(model_dir).image_processor
    items = [
        {
            "pixel_values": image_processor(images=[load_image(entry["image"])], return_tensors="pt")["pixel_values"],
            "budget": int(entry["budget"]),
            "selector": entry["selector"],
            "instruction": [int(token) for token in entry["instruction"]],
        }
        for entry in probe
    ]
    from textscythe_vllm.testing.worker_probe import probe_llava

    (results,) = llm.apply_model(functools.partial(probe_llava, items=items))
    return results


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update({key: str(value) for key, value in spec.get("env", {}).items()})

    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm_kwargs = dict(
        model=spec["model"], enforce_eager=True, max_model_len=4096, seed=0, dtype="float32",
        enable_prefix_caching=False,
    )
    llm_kwargs.update(spec.get("llm_kwargs", {}))
    llm = LLM(**llm_kwargs)
    timings = {"start_s": time.monotonic() - started}

    requests = spec["requests"]

    def params(request: dict[str, Any]) -> Any:
        return SamplingParams(
            temperature=0.0, max_tokens=int(request.get("max_tokens", 8)), ignore_eos=True, logprobs=1
        )

    results: dict[str, Any] = {}
    started = time.monotonic()
    batch = llm.generate([build_prompt(r) for r in requests], [params(r) for r in requests], use_tqdm=False)
    results["batch"] = generation_entries(requests, batch)
    timings["batch_s"] = time.monotonic() - started

    if spec.get("solo", True):
        started = time.monotonic()
        solo = [llm.generate([build_prompt(r)], [params(r)], use_tqdm=False)[0] for r in requests]
        results["solo"] = generation_entries(requests, solo)
        timings["solo_s"] = time.monotonic() - started

    if spec.get("probe"):
        started = time.monotonic()
        results["probe"] = run_probe(llm, spec["model"], spec["probe"])
        timings["probe_s"] = time.monotonic() - started

    results["timings"] = timings
    Path(spec["output"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/offline_runner.py SPEC.json")
    raise SystemExit(main(sys.argv[1]))
