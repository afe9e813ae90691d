"""Real ``vllm serve`` with the plugin on a tiny Qwen2.5-VL (saved random weights), driven through the ``openai`` SDK:
images, videos and both in one request, chunked prefill (``--max-num-batched-tokens 128``)."""

from __future__ import annotations

import pytest

from textscythe_dev.images import media_message as message
from textscythe_dev.images import scene
from textscythe_dev.server import (
    BAD_VALUES,
    Served,
    assert_budget_prunes_each_item,
    assert_pruned_repeat_is_identical,
    assert_refused,
    chat,
    prompt_tokens,
)

pytestmark = pytest.mark.server

BLOCK = 32
QUESTION = "what is the dog doing next to the red car ?"
IMAGE_TOKENS = 96  # 336 x 224 px -> 24 x 16 patches -> 12 x 8 merged tokens


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from textscythe_dev.tiny_qwen import build_tiny_qwen2_5_vl

    # saved random weights, float32: the pixels drive the logits, so a repeat that matches proves something
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), with_weights=True)


SERVED = Served("tiny_qwen_dir", ("--dtype", "float32", "--enable-prefix-caching", "--enable-prompt-tokens-details", "--seed",
                                   "0", "--block-size", str(BLOCK), "--max-num-batched-tokens", "128",
                                   "--limit-mm-per-prompt", '{"image": 2, "video": 2}'), name="tiny-qwen")


def whole_video_tokens(client, server, messages) -> int:
    """The placeholders of the one video in ``messages``, from what a budget of 1 removes (it counts them all)."""
    return prompt_tokens(client, server, messages) - prompt_tokens(client, server, messages, 1) + 1


def test_image_budgets_change_prompt_tokens_exactly(client, server):
    messages = [message(QUESTION, images=[scene(1, 336, 224)])]
    budgets = (1, 16, 40, IMAGE_TOKENS - 1, IMAGE_TOKENS, IMAGE_TOKENS + 1, 10_000)
    full = assert_budget_prunes_each_item(client, server, messages, [IMAGE_TOKENS], budgets)
    assert full - IMAGE_TOKENS > 5


def test_video_budgets_change_prompt_tokens_exactly(client, server, clip):
    messages = [message(QUESTION, videos=[clip])]
    video_tokens = whole_video_tokens(client, server, messages)
    assert video_tokens >= 48
    assert_budget_prunes_each_item(client, server, messages, [video_tokens], (7, 24, video_tokens - 1, video_tokens + 5))


def test_image_and_video_in_one_request_budget_per_item(client, server, clip):
    video_tokens = whole_video_tokens(client, server, [message(QUESTION, videos=[clip])])
    both = [message(QUESTION, images=[scene(3, 336, 224)], videos=[clip])]
    assert_budget_prunes_each_item(client, server, both, [IMAGE_TOKENS, video_tokens], (5, 50))
    image = [message(QUESTION, images=[scene(3, 336, 224)])]
    assert_budget_prunes_each_item(client, server, image, [IMAGE_TOKENS], [5])
    two_images = [message(QUESTION, images=[scene(4, 336, 224), scene(5, 224, 336)])]
    assert_budget_prunes_each_item(client, server, two_images, [IMAGE_TOKENS, IMAGE_TOKENS], [9])


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_400(client, server, clip, field, value):
    assert_refused(client, server, [message(QUESTION, images=[scene(6, 336, 224)], videos=[clip])], field, value)


def test_every_selector_serves_images_and_videos(client, server, clip):
    from textscythe_vllm.selectors import available_selectors

    video_tokens = whole_video_tokens(client, server, [message(QUESTION, videos=[clip])])
    both = [message(QUESTION, images=[scene(7, 336, 224)], videos=[clip])]
    for selector in available_selectors():
        assert_budget_prunes_each_item(client, server, both, [IMAGE_TOKENS, video_tokens], [12],
                                       visual_token_selector=selector)
    assert server.alive()


def test_streaming_and_repeat_are_deterministic_with_prefix_cache(client, server, clip):
    both = [message(QUESTION, images=[scene(8, 336, 224)], videos=[clip])]
    # the repeat check can fail: another image (same size, same budget) moves the outputs far more than 1e-4
    first = assert_pruned_repeat_is_identical(
        client, server, both, [message(QUESTION, images=[scene(9, 336, 224)], videos=[clip])], budget=20,
        cached_at_least=BLOCK)
    stream = client.chat.completions.create(
        model=server.model_name, messages=both, max_tokens=6, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"visual_token_budget": 20},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == first.choices[0].message.content
    assert [chunk.usage for chunk in chunks if chunk.usage][-1].prompt_tokens == first.usage.prompt_tokens


def test_explanation_lays_out_images_and_video_frames(client, server, clip):
    import httpx

    response = chat(client, server, [message(QUESTION, images=[scene(8, 336, 224)], videos=[clip])], 20,
                    visual_token_explain=True)
    items = httpx.get(f"{server.base_url}/v1/textscythe/explanations/{response.id}", timeout=30).json()["items"]
    layouts = {item["modality"]: item["layout"] for item in items}
    assert layouts["image"] == {"kind": "grid", "rows": 8, "cols": 12, "region": "whole"}  # 224 x 336 px, merged 2x2
    video = layouts["video"]
    assert video["kind"] == "grid" and video["frames"] * video["rows"] * video["cols"] == \
        next(item["num_tokens"] for item in items if item["modality"] == "video")
    assert all(item["kept"] == 20 for item in items)
