"""LLaVA-OneVision's SigLIP attention and selection against transformers, on the same random weights.

vLLM (offline ``vllm.LLM`` with the plugin, float32) runs the tiny checkpoint saved by transformers; the HF
reference is ``LlavaOnevisionForConditionalGeneration`` with eager attention (``output_attentions``). Checked:

* the plugin's probe -- read from vLLM's own SigLIP forward pass -- equals the mean attention each token receives
  in HF's last tower layer, averaged over heads and queries, for every view of an any-resolution image;
* a pruned request's kept positions (``cls_attention``: the top-K attention rows, so the positions are a direct
  function of the attention map and its layout) equal the top-K of HF's attention laid out over the merged rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from textscythe_dev import tiny_onevision
from textscythe_dev.images import scene
from textscythe_dev.server import cpu_test_env
from textscythe_vllm.models.llava_onevision import image_layout
from textscythe_vllm.pruning import SELECTION_LOG_ENV

pytestmark = pytest.mark.server

IMAGE = (800, 400)
BUDGET = 150
PROMPT = "<|im_start|>user\n<image>\nwhat is on the left ?<|im_end|>\n<|im_start|>assistant\n"

RUNNER = textwrap.dedent('''
    import functools, json, sys
    import torch
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams
    from textscythe_dev.images import scene
    from textscythe_dev.worker_probe import probe_tower_attention

    if __name__ == "__main__":
        model_dir, width, height, budget, prompt, output = sys.argv[1:]
        image = scene(7, int(width), int(height))
        llm = LLM(model=model_dir, enforce_eager=True, max_model_len=12000, seed=0, dtype="float32",
                  enable_prefix_caching=False, limit_mm_per_prompt={"image": 1, "video": 0})
        pixel_values = AutoProcessor.from_pretrained(model_dir).image_processor(
            images=[image], return_tensors="pt")["pixel_values"][0]
        (attention,) = llm.apply_model(functools.partial(probe_tower_attention, pixel_values=pixel_values))
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image},
                       "mm_processor_kwargs": {"visual_token_budget": int(budget),
                                               "visual_token_selector": "cls_attention"}}],
                     SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        with open(output, "w") as f:
            json.dump({"attention": attention}, f)
''')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_onevision.build_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision-weights"), with_weights=True)


@pytest.fixture(scope="module")
def vllm_run(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("onevision-run")
    script, output, log = workdir / "runner.py", workdir / "out.json", workdir / "selections.jsonl"
    script.write_text(RUNNER)
    env = cpu_test_env({SELECTION_LOG_ENV: str(log), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
    completed = subprocess.run(
        [sys.executable, str(script), str(model_dir), *map(str, IMAGE), str(BUDGET), PROMPT, str(output)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(output.read_text())
    result["selections"] = [json.loads(line) for line in log.read_text().splitlines()]
    return result


@pytest.fixture(scope="module")
def hf_reference(model_dir):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processed = AutoProcessor.from_pretrained(model_dir).image_processor(images=[scene(7, *IMAGE)], return_tensors="pt")
    with torch.no_grad():
        out = model.model.vision_tower(processed["pixel_values"][0], output_attentions=True)
    weights = out.attentions[-1]  # [views, heads, queries, keys]
    return SimpleNamespace(attention=weights.mean(dim=2).mean(dim=1), image_size=processed["image_sizes"][0],
                           config=model.config)


def test_probe_equals_hf_mean_received_attention(vllm_run, hf_reference):
    ours = torch.tensor(vllm_run["attention"])
    assert ours.shape == hf_reference.attention.shape and ours.shape[0] > 1  # base view + tiles
    torch.testing.assert_close(ours, hf_reference.attention, rtol=1e-4, atol=1e-7)
    assert hf_reference.attention.std() > 0.05 * hf_reference.attention.mean()  # far from uniform


def test_kept_positions_are_hf_top_attention_rows(vllm_run, hf_reference):
    (record,) = vllm_run["selections"]
    scores, is_content = image_layout(SimpleNamespace(config=hf_reference.config), hf_reference.image_size,
                                      hf_reference.attention)
    assert record["num_tokens"] == scores.shape[0] and record["budget"] == BUDGET
    content_rows = is_content.nonzero().squeeze(1)
    ranked = torch.argsort(-scores[content_rows], stable=True)[:BUDGET]
    assert record["kept_positions"] == sorted(content_rows[ranked].tolist())
