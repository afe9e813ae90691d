"""Real ``vllm serve`` with the plugin on a tiny Qwen3-VL (DeepStack, interleaved M-RoPE, timestamped videos;
saved random float32 weights), driven through the ``openai`` SDK with chunked prefill (``--max-num-batched-tokens
128``): images, videos (the budget spread over frames, every timestamp kept), both in one request, bad values,
every selector, ``/metrics`` before/after, and -- against a stock ``vllm serve`` (``VLLM_PLUGINS=``) on the same
weights -- requests without a budget identical token for token."""

from __future__ import annotations

import httpx
import pytest

from textscythe_dev.images import media_message as message
from textscythe_dev.images import scene
from textscythe_dev.load import metric_sum
from textscythe_dev.server import (
    BAD_VALUES,
    Served,
    assert_budget_prunes_each_item,
    assert_image_drives_outputs,
    assert_no_budget_is_stock,
    assert_pruned_repeat_is_identical,
    assert_refused,
    chat,
    prompt_tokens,
)
from textscythe_vllm.processing import spread_budget

pytestmark = pytest.mark.server

BLOCK = 32
QUESTION = "what is the dog doing next to the red car ?"
IMAGE_TOKENS = 70  # 336 x 224 px -> 320 x 224 (32 px multiples) -> 10 x 7 merged tokens
FRAMES, FRAME_TOKENS = 4, 20  # 8 frames of 168 x 112 px at 2 fps -> 4 temporal patches of 5 x 4 merged tokens
VIDEO_TOKENS = FRAMES * FRAME_TOKENS
ARGS = ("--dtype", "float32", "--seed", "0", "--max-num-batched-tokens", "128",
        "--limit-mm-per-prompt", '{"image": 2, "video": 2}')

SERVED = Served("model_dir", (*ARGS, "--enable-prefix-caching", "--enable-prompt-tokens-details",
                              "--block-size", str(BLOCK)), name="tiny-qwen3-vl", timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"), with_weights=True)


def tokenized(server, messages, budget=None) -> list[int]:
    body = {"model": server.model_name, "messages": messages}
    if budget is not None:
        body["visual_token_budget"] = budget
    response = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_image_budgets_change_prompt_tokens_exactly(client, server):
    messages = [message(QUESTION, images=[scene(1, 336, 224)])]
    budgets = (1, 16, 40, IMAGE_TOKENS - 1, IMAGE_TOKENS, IMAGE_TOKENS + 1, 10_000)
    full = assert_budget_prunes_each_item(client, server, messages, [IMAGE_TOKENS], budgets)
    assert full - IMAGE_TOKENS > 5


def test_video_budget_is_spread_over_frames_and_timestamps_stay(client, server, clip):
    from textscythe_dev.tiny_qwen import SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START

    pad, start, end = (SPECIAL_TOKENS.index(token) for token in (VIDEO_PAD, VISION_START, VISION_END))
    messages = [message(QUESTION, videos=[clip])]
    full_ids = tokenized(server, messages)
    full = prompt_tokens(client, server, messages)
    assert full == len(full_ids) and full_ids.count(pad) == VIDEO_TOKENS

    def frames(ids: list[int]) -> list[int]:
        """Placeholders per frame run. The template's <|vision_start|> <|video_pad|> <|vision_end|> becomes
        <|vision_start|> then, per frame, <t seconds> <|vision_start|> pads <|vision_end|>, then <|vision_end|>."""
        counts, inside = [], False
        for token in ids:
            if token == start:
                counts.append(0)
                inside = True
            elif token == end:
                inside = False
            elif inside and token == pad:
                counts[-1] += 1
        assert counts[0] == 0  # the template's own <|vision_start|> holds no placeholder directly
        return counts[1:]

    assert frames(full_ids) == [FRAME_TOKENS] * FRAMES
    without_pads = [token for token in full_ids if token != pad]
    for budget in (1, 3, 7, 24, VIDEO_TOKENS - 1):
        pruned_ids = tokenized(server, messages, budget)
        assert prompt_tokens(client, server, messages, budget) == full - VIDEO_TOKENS + budget == len(pruned_ids)
        assert frames(pruned_ids) == spread_budget(budget, [FRAME_TOKENS] * FRAMES), budget
        assert [token for token in pruned_ids if token != pad] == without_pads  # every timestamp, every marker
    assert prompt_tokens(client, server, messages, VIDEO_TOKENS + 5) == full


def test_images_and_video_in_one_request_budget_per_item(client, server, clip):
    both = [message(QUESTION, images=[scene(3, 336, 224)], videos=[clip])]
    assert_budget_prunes_each_item(client, server, both, [IMAGE_TOKENS, VIDEO_TOKENS], (5, 50))
    three = [message(QUESTION, images=[scene(4, 336, 224), scene(5, 224, 336)], videos=[clip])]
    assert_budget_prunes_each_item(client, server, three, [IMAGE_TOKENS, IMAGE_TOKENS, VIDEO_TOKENS], [9])


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_400(client, server, clip, field, value):
    assert_refused(client, server, [message(QUESTION, images=[scene(6, 336, 224)], videos=[clip])], field, value)


def test_every_selector_serves_images_and_videos(client, server, clip):
    from textscythe_vllm.selectors import available_selectors

    both = [message(QUESTION, images=[scene(7, 336, 224)], videos=[clip])]
    for selector in available_selectors():
        assert_budget_prunes_each_item(client, server, both, [IMAGE_TOKENS, VIDEO_TOKENS], [12],
                                       visual_token_selector=selector)
    assert server.alive()


def _metrics(server) -> str:
    return httpx.get(f"{server.base_url}/metrics", timeout=30).text


def test_metrics_count_tokens_before_and_after(client, server, clip):
    def counters() -> tuple[float, float, float]:
        text = _metrics(server)
        return (metric_sum(text, "textscythe_visual_tokens_before_total", model_name=server.model_name),
                metric_sum(text, "textscythe_visual_tokens_after_total", model_name=server.model_name),
                metric_sum(text, "textscythe_requests_total", model_name=server.model_name))

    before = counters()
    chat(client, server, [message(QUESTION, images=[scene(10, 336, 224)], videos=[clip])], 30)
    chat(client, server, [message(QUESTION, images=[scene(11, 336, 224)])])
    after = counters()
    assert after[0] - before[0] == IMAGE_TOKENS + VIDEO_TOKENS + IMAGE_TOKENS
    assert after[1] - before[1] == 30 + 30 + IMAGE_TOKENS
    assert after[2] - before[2] == 2


def test_repeat_is_deterministic_with_prefix_cache_and_the_image_drives_outputs(client, server, clip):
    assert_pruned_repeat_is_identical(
        client, server, [message(QUESTION, images=[scene(8, 336, 224)], videos=[clip])],
        [message(QUESTION, images=[scene(9, 336, 224)], videos=[clip])], budget=20, cached_at_least=BLOCK)


def test_explanation_lays_out_images_and_video_frames(client, server, clip):
    response = chat(client, server, [message(QUESTION, images=[scene(8, 336, 224)], videos=[clip])], 20,
                    visual_token_explain=True)
    items = httpx.get(f"{server.base_url}/v1/textscythe/explanations/{response.id}", timeout=30).json()["items"]
    layouts = {item["modality"]: item["layout"] for item in items}
    assert layouts["image"] == {"kind": "grid", "rows": 7, "cols": 10, "region": "whole"}
    assert layouts["video"]["frames"] == FRAMES
    video = next(item for item in items if item["modality"] == "video")
    per_frame = [sum(1 for position in video["kept_positions"] if position // FRAME_TOKENS == frame)
                 for frame in range(FRAMES)]
    assert per_frame == spread_budget(20, [FRAME_TOKENS] * FRAMES)


CONVERSATIONS = {
    "image": [message(QUESTION, images=[scene(12, 336, 224)])],
    "video": [message(QUESTION, videos=["VIDEO"])],
    "system+image+video": [{"role": "system", "content": "you answer in few words ."},
                           message(QUESTION, images=[scene(13, 224, 336)], videos=["VIDEO"])],
}


def _with_clip(conversation, clip):
    return [{**turn, "content": [
        {"type": "video_url", "video_url": {"url": clip}} if part.get("type") == "video_url" else part
        for part in turn["content"]]} if isinstance(turn["content"], list) else turn for turn in conversation]


def test_no_budget_is_stock_vllm_token_for_token(client, server, clip, model_dir, tmp_path):
    conversations = {name: _with_clip(conversation, clip) for name, conversation in CONVERSATIONS.items()}
    ours = assert_no_budget_is_stock(client, server, model_dir, ARGS, conversations, tmp_path / "stock.log")
    assert_image_drives_outputs(ours["image"], ours["system+image+video"])
