"""Pruned InternVL in vLLM against an independent transformers reference, for both formats vLLM serves.

The tiny builder gives the HF format (``InternVLForConditionalGeneration``) and the chat format
(``InternVLChatModel``) the same random float32 weights. Each format is served by a real ``vllm serve`` with the
plugin (one at a time), which writes every pruned item's kept positions to ``$TEXTSCYTHE_SELECTION_LOG``. The
reference is transformers' ``InternVLForConditionalGeneration`` (eager attention) on the HF-format directory,
fed the pruned prompt: the image's projected rows at the kept positions in place of its placeholder run (1-D
positions, consecutive, as vLLM gives them), then greedy decoding without a KV cache. Checked, per format, for
several budgets and two selectors on an image of 2 x 1 tiles + thumbnail:

* the server's ``usage.prompt_tokens`` is the reference prompt's length;
* greedy tokens identical, log-probabilities within :data:`LOGPROB_ATOL`;
* ``cls_attention``'s kept positions are the top-K of transformers' own [CLS] attention at the last tower layer
  (``output_attentions``), laid out over the tokens by the pixel-shuffle rule written out here (v2: token
  ``(r, c)`` packs patches ``(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)``) -- the whole probe path, end to end.

Pixel values: transformers' processor, for both formats. vLLM's chat-format preprocessing resizes with
torchvision where transformers uses PIL; for this image (tiles cut from a 224 x 112 picture without resizing, one
thumbnail resize) the two agree to ~2.4e-7 (checked in :func:`test_both_preprocessings_agree_on_this_image`), far
inside what the log-probability tolerance allows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from textscythe_dev import tiny_internvl
from textscythe_dev.images import data_url, scene
from textscythe_dev.server import VLLMServer
from textscythe_vllm.pruning import SELECTION_LOG_ENV

pytestmark = pytest.mark.server

QUESTION = "what is the dog doing next to the red car ?"
IMAGE = scene(71, 224, 112)  # 2 x 1 tiles + the thumbnail
IMAGE_TOKENS = 3 * tiny_internvl.TOKENS_PER_TILE
MAX_TOKENS = 4
# float32 on both sides (transformers eager, vLLM CPU kernels): observed differences are ~1e-6
LOGPROB_ATOL = 1e-4
CASES = [(None, "textscythe"), (5, "textscythe"), (20, "textscythe"), (5, "cls_attention"), (20, "cls_attention"),
         (47, "cls_attention")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-internvl-equivalence")
    return {fmt: tiny_internvl.build_tiny_internvl(root / fmt, fmt=fmt, with_weights=True)
            for fmt in tiny_internvl.FORMATS}


@pytest.fixture(scope="module")
def hf_model(weights):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(
        weights["hf"], dtype=torch.float32, attn_implementation="eager").eval()


def pixel_values() -> torch.Tensor:
    """``[tiles, 3, 112, 112]``: transformers' preprocessing of :data:`IMAGE` (thumbnail last)."""
    processor = tiny_internvl.build_processor(tiny_internvl.build_tokenizer())
    return processor.image_processor(images=[IMAGE], return_tensors="pt")["pixel_values"]


def test_both_preprocessings_agree_on_this_image():
    from vllm.transformers_utils.processors.internvl import image_to_pixel_values_internvl

    chat = image_to_pixel_values_internvl(IMAGE, input_size=tiny_internvl.IMAGE_SIZE, min_num=1,
                                          max_num=tiny_internvl.MAX_DYNAMIC_PATCH, use_thumbnail=True)
    assert chat.shape == pixel_values().shape == (3, 3, tiny_internvl.IMAGE_SIZE, tiny_internvl.IMAGE_SIZE)
    torch.testing.assert_close(chat, pixel_values(), atol=1e-6, rtol=0)


@torch.no_grad()
def image_rows(hf_model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [tiles * 16, D], [CLS] attention per token [tiles * 16])`` from transformers."""
    features = hf_model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    tower = hf_model.model.vision_tower(pixel_values=pixels, output_attentions=True)
    patches = tower.attentions[-1].mean(dim=1)[:, 0, 1:]  # [tiles, 64]: [CLS] query, heads averaged
    side = tiny_internvl.PATCHES_PER_SIDE
    grid = patches.reshape(-1, side // 2, 2, side // 2, 2)  # [tiles, r, 2, c, 2]
    tokens = grid.mean(dim=(2, 4)).reshape(patches.shape[0], -1)  # [tiles, 16], token r * 4 + c
    return features.reshape(-1, features.shape[-1]), tokens.reshape(-1)


@torch.no_grad()
def reference(hf_model, rows: torch.Tensor) -> tuple[int, list[int], list[float]]:
    """``(prompt length, greedy tokens, their log-probabilities)`` with ``rows`` as the image's run."""
    tokenizer = tiny_internvl.build_tokenizer("hf")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    before, after = text.split(tiny_internvl.IMG_CONTEXT)
    vocab = tiny_internvl.vocabulary()
    table = hf_model.get_input_embeddings()

    def embed(ids: list[int]) -> torch.Tensor:
        return table(torch.tensor(ids, dtype=torch.long))

    opening = [*tokenizer.encode(before, add_special_tokens=False), vocab[tiny_internvl.IMG_START]]
    closing = [vocab[tiny_internvl.IMG_END], *tokenizer.encode(after, add_special_tokens=False)]
    embeds = torch.cat([embed(opening), rows, embed(closing)])
    length, tokens, logprobs = embeds.shape[0], [], []
    for _ in range(MAX_TOKENS):
        logits = hf_model(inputs_embeds=embeds[None], use_cache=False).logits[0, -1].float()
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        embeds = torch.cat([embeds, embed([token])])
    return length, tokens, logprobs


@pytest.fixture(scope="module", params=tiny_internvl.FORMATS)
def served(request, weights, tmp_path_factory) -> dict[str, Any]:
    """One format's server answers every case (greedy, with log-probabilities); its selection log alongside."""
    import openai

    fmt = request.param
    workdir = tmp_path_factory.mktemp(f"equivalence-{fmt}")
    log = workdir / "selections.jsonl"
    args = ["--dtype", "float32", "--seed", "0"] + (["--trust-remote-code"] if fmt == "chat" else [])
    results = {}
    with VLLMServer(weights[fmt], args, env={SELECTION_LOG_ENV: str(log)}, log_path=workdir / "vllm.log",
                    served_model_name=f"internvl-{fmt}") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                                 {"type": "text", "text": QUESTION}]}]
        for budget, selector in CASES:
            done = len(log.read_text().splitlines()) if log.exists() else 0
            extra = None if budget is None else {"visual_token_budget": budget, "visual_token_selector": selector}
            response = client.chat.completions.create(
                model=server.model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True,
                extra_body=extra)
            records = [json.loads(line) for line in log.read_text().splitlines()[done:]] if log.exists() else []
            results[(budget, selector)] = {
                "prompt_tokens": response.usage.prompt_tokens,
                "tokens": [entry.token for entry in response.choices[0].logprobs.content],
                "logprobs": [entry.logprob for entry in response.choices[0].logprobs.content],
                "records": records,
            }
    return {"fmt": fmt, "results": results}


def kept_positions(result: dict[str, Any], budget: int | None) -> list[int]:
    if budget is None:
        assert result["records"] == []
        return list(range(IMAGE_TOKENS))
    (record,) = result["records"]
    assert record["budget"] == budget and record["num_tokens"] == IMAGE_TOKENS
    return record["kept_positions"]


@pytest.mark.parametrize(("budget", "selector"), CASES)
def test_server_matches_transformers_fed_the_kept_rows(served, hf_model, budget, selector):
    result = served["results"][(budget, selector)]
    kept = kept_positions(result, budget)
    assert len(kept) == min(budget or IMAGE_TOKENS, IMAGE_TOKENS) and kept == sorted(set(kept))
    features, _ = image_rows(hf_model, pixel_values())
    length, tokens, logprobs = reference(hf_model, features[kept])
    assert result["prompt_tokens"] == length
    tokenizer = tiny_internvl.build_tokenizer("hf")
    assert result["tokens"] == [tokenizer.decode([token]) for token in tokens]
    torch.testing.assert_close(torch.tensor(result["logprobs"], dtype=torch.float64),
                               torch.tensor(logprobs, dtype=torch.float64), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("budget", [5, 20, 47])
def test_cls_attention_keeps_transformers_top_attention_tokens(served, hf_model, budget):
    _, attention = image_rows(hf_model, pixel_values())
    ranked = torch.argsort(-attention, stable=True)
    margin = float(attention[ranked[budget - 1]] - attention[ranked[budget]])
    assert margin > 1e-6  # no near-tie at the cut: the top-K is well defined at float32 agreement
    kept = kept_positions(served["results"][(budget, "cls_attention")], budget)
    assert kept == sorted(ranked[:budget].tolist())


def test_comparisons_can_tell_selections_apart(served, hf_model):
    """Guards against a vacuous pass: the two selectors keep different rows, and another selection of the same
    size moves the log-probabilities far beyond the tolerance."""
    results = served["results"]
    textscythe, cls = kept_positions(results[(20, "textscythe")], 20), kept_positions(results[(20, "cls_attention")], 20)
    assert textscythe != cls
    features, _ = image_rows(hf_model, pixel_values())
    _, _, wrong = reference(hf_model, features[cls])
    largest = max(abs(a - b) for a, b in zip(results[(20, "textscythe")]["logprobs"], wrong, strict=True))
    assert largest > 10 * LOGPROB_ATOL
