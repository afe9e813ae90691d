"""``python -m textscythe_dev.hash_probe OUT.json DIR [DIR ...]``: the multimodal hashes and placeholder
counts vLLM's processor gives requests without a budget, for each checkpoint directory -- with the plugin, or with
stock vLLM when run under ``VLLM_PLUGINS=`` (the plugin's processor then never loads).

Each checkpoint gets the same inputs: one image, two images of different sizes, and (for families that take
videos) an image plus a video, rendered with the checkpoint's own chat template. Run in a subprocess per side,
because vLLM's model registry is process-global.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def probe(model_dir: str) -> dict[str, Any]:
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from textscythe_dev.images import scene
    from textscythe_dev.tiny_qwen import tiny_video

    config = ModelConfig(model=model_dir, limit_mm_per_prompt={"image": 2, "video": 1})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    tokenizer = processor.info.get_tokenizer()
    supported = processor.info.get_supported_mm_limits()
    cases: dict[str, dict[str, list[Any]]] = {
        "one image": {"image": [scene(1)]},
        "two images": {"image": [scene(2, 336, 224), scene(3, 500, 700)]},
    }
    if "video" in supported:
        cases["image and video"] = {"image": [scene(4)], "video": [tiny_video(5, 4)]}
    results: dict[str, Any] = {"processor": type(processor).__name__}
    for name, data in cases.items():
        parts = [{"type": modality} for modality, items in data.items() for _ in items]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": [*parts, {"type": "text", "text": "what is the dog doing ?"}]}],
            tokenize=False, add_generation_prompt=True,
        )
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        inputs = ProcessorInputs(ids, processor.info.parse_mm_data(data), hf_processor_mm_kwargs={})
        output = processor.apply(inputs, TimingContext(enabled=False))
        results[name] = {
            "hashes": {modality: list(hashes) for modality, hashes in output["mm_hashes"].items()},
            "placeholders": {modality: [p.length for p in placeholders]
                             for modality, placeholders in output["mm_placeholders"].items()},
            "prompt_token_ids": list(output["prompt_token_ids"]),
        }
    return results


def main(argv: list[str]) -> int:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    out, *model_dirs = argv
    Path(out).write_text(json.dumps({model_dir: probe(model_dir) for model_dir in model_dirs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
