"""Real ``vllm serve`` with the plugin on a tiny LLaVA-1.5, driven through the official ``openai`` SDK."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from textscythe_dev.images import image_part, scene, user_message
from textscythe_dev.load import metric_sum
from textscythe_dev.server import Served, chat

pytestmark = pytest.mark.server

IMAGE_TOKENS = 576  # 336 px / 14 px patches, [CLS] dropped
BLOCK = 32  # KV-cache block size (CPU attention needs a multiple of 32): prefix-cache hits are whole blocks
QUESTION = "what colour is the umbrella next to the red car ?"


SERVED = Served("tiny_llava_dir", ("--load-format", "dummy", "--enable-prefix-caching", "--enable-prompt-tokens-details",
                                    "--seed", "0", "--block-size", str(BLOCK)), timeout=120)


def test_budgets_change_prompt_tokens_by_exactly_the_pruned_count(client, server):
    messages = [user_message(QUESTION, scene(1))]
    full = chat(client, server, messages).usage.prompt_tokens
    text_tokens = full - IMAGE_TOKENS
    assert text_tokens > 5
    for budget in (1, 64, 192):
        assert chat(client, server, messages, budget).usage.prompt_tokens == text_tokens + budget
    for budget in (IMAGE_TOKENS, IMAGE_TOKENS + 1, 10_000):
        assert chat(client, server, messages, budget).usage.prompt_tokens == full


def test_budget_inside_mm_processor_kwargs_and_selector_choice(client, server):
    messages = [user_message(QUESTION, scene(2))]
    full = chat(client, server, messages).usage.prompt_tokens
    inside = chat(client, server, messages, mm_processor_kwargs={"visual_token_budget": 32})
    assert inside.usage.prompt_tokens == full - IMAGE_TOKENS + 32
    from textscythe_vllm.selectors import available_selectors

    for selector in available_selectors():
        response = chat(client, server, messages, 48, visual_token_selector=selector)
        assert response.usage.prompt_tokens == full - IMAGE_TOKENS + 48, selector


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("visual_token_budget", 0),
        ("visual_token_budget", -3),
        ("visual_token_budget", 1.5),
        ("visual_token_budget", 64.0),
        ("visual_token_budget", True),
        ("visual_token_budget", "64"),
        ("visual_token_budget", [64]),
        ("visual_token_budget", None),
        ("visual_token_budget", 2**70),
        ("visual_token_selector", "no-such-selector"),
        ("visual_token_selector", 3),
    ],
)
def test_bad_values_are_400_naming_the_field(client, server, field, value):
    body = {field: value}
    if field == "visual_token_selector":
        body["visual_token_budget"] = 64
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=server.model_name, messages=[user_message(QUESTION, scene(3))], max_tokens=2, extra_body=body
        )
    error = caught.value
    assert error.status_code == 400
    assert error.body["param"] == field
    assert field in error.body["message"]
    assert server.alive()


def test_client_cannot_set_other_processor_kwargs(client, server):
    messages = [user_message(QUESTION, scene(4))]
    full = chat(client, server, messages).usage.prompt_tokens
    # Unknown/unsafe keys are dropped by the middleware; the allow-listed budget still applies.
    response = chat(
        client, server, messages,
        mm_processor_kwargs={"visual_token_budget": 16, "do_resize": False, "size": {"shortest_edge": 14}},
        media_io_kwargs={"image": {"mode": "L"}},
    )
    assert response.usage.prompt_tokens == full - IMAGE_TOKENS + 16


def test_streaming_with_a_budget(client, server):
    stream = client.chat.completions.create(
        model=server.model_name, messages=[user_message(QUESTION, scene(5))], max_tokens=4, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"visual_token_budget": 64},
    )
    chunks = list(stream)
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert usage and usage[-1].completion_tokens >= 1
    assert usage[-1].prompt_tokens == chat(client, server, [user_message(QUESTION, scene(5))]).usage.prompt_tokens \
        - IMAGE_TOKENS + 64
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in chunks)


def test_completions_endpoint_with_budget(client, server):
    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    response = client.completions.create(
        model=server.model_name, prompt=prompt, max_tokens=2, temperature=0.0, extra_body={"visual_token_budget": 8}
    )
    # /v1/completions takes no images: the budget is accepted and simply has nothing to prune -- the prompt is
    # counted exactly as without a budget, as its own tokens (BOS included; "<image>" is one text token here)
    unbudgeted = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=2, temperature=0.0)
    from transformers import AutoTokenizer

    expected = len(AutoTokenizer.from_pretrained(server.args[2])(prompt)["input_ids"])
    assert response.usage.prompt_tokens == unbudgeted.usage.prompt_tokens == expected


def test_responses_endpoint_with_budget(client, server):
    from textscythe_dev.images import data_url

    def input_tokens(budget):
        content = [{"type": "input_image", "image_url": data_url(scene(10))}, {"type": "input_text", "text": QUESTION}]
        return client.responses.create(
            model=server.model_name, input=[{"role": "user", "content": content}], max_output_tokens=2,
            temperature=0.0, extra_body=None if budget is None else {"visual_token_budget": budget},
        ).usage.input_tokens

    ttft_before = _ttft_count(server, "<=64")
    assert input_tokens(24) == input_tokens(None) - IMAGE_TOKENS + 24
    # the responses route gets the latency-by-budget metrics too (vLLM reports it as "<request_id>_0")
    _wait_for(lambda: _ttft_count(server, "<=64") == ttft_before + 1)
    response = client.responses.create(model=server.model_name, input="hi", max_output_tokens=1)
    assert response.id.startswith("resp_")  # vLLM's own id, not one the middleware made up


def _metrics(server) -> str:
    with urllib.request.urlopen(f"{server.base_url}/metrics") as response:
        return response.read().decode()


def _ttft_count(server, bucket: str) -> float:
    return metric_sum(_metrics(server), "textscythe_request_ttft_seconds_count", budget_bucket=bucket)


def _wait_for(condition, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_two_images_one_budget_applies_per_image(client, server):
    messages = [user_message(QUESTION, scene(6), scene(7))]
    full = chat(client, server, messages).usage.prompt_tokens
    assert chat(client, server, messages, 40).usage.prompt_tokens == full - 2 * IMAGE_TOKENS + 2 * 40


def cached_tokens(response) -> int:
    details = response.usage.prompt_tokens_details
    return 0 if details is None else (details.cached_tokens or 0)


def full_blocks(tokens: int) -> int:
    return tokens // BLOCK * BLOCK


def test_prefix_cache_keys_cover_budget_and_question(client, server):
    image = scene(8)
    first = chat(client, server, [user_message(QUESTION, image)], 96)
    again = chat(client, server, [user_message(QUESTION, image)], 96)
    # Identical request: every full block but the one holding the last prompt token is a prefix-cache hit,
    # the image's 96 kept tokens included.
    assert cached_tokens(first) == 0
    assert cached_tokens(again) == full_blocks(again.usage.prompt_tokens - 1) >= 96
    # The image sits right after "USER:", so a new selection (other budget or other question) shares no block;
    # with stock hashing the other question would hit the image's blocks.
    other_budget = chat(client, server, [user_message(QUESTION, image)], 97)
    other_question = chat(client, server, [user_message("is there a dog on the grass ?", image)], 96)
    assert cached_tokens(other_budget) == 0
    assert cached_tokens(other_question) == 0


def _selections(server) -> float:
    """How many selections the worker has run (``textscythe_selector_latency_seconds_count``, all selectors)."""
    return metric_sum(_metrics(server), "textscythe_selector_latency_seconds_count")


def test_encoder_cache_serves_an_earlier_turns_image(client, server):
    """docs/how-it-works.md: across the turns of a chat the image's selection is reused. Here the prefix cache
    cannot help (the system prompt changes, so no block matches from position 1), yet the worker neither encodes
    nor selects the image again: its hash is unchanged (same image, budget, selector and user words), so vLLM's
    encoder cache serves the kept rows."""
    image = scene(31)
    first = chat(client, server, [{"role": "system", "content": "be brief ."},
                                  user_message("what colour is the umbrella ?", image)], 96)
    before = _selections(server)
    assert before >= 1
    later = chat(client, server, [{"role": "system", "content": "answer in one word please ."},
                                  user_message("what colour is the umbrella ?", image),
                                  {"role": "assistant", "content": "it is red"},
                                  {"role": "user", "content": "and the car ?"}], 96)
    assert cached_tokens(later) == 0  # no prefix-cache hit at all
    assert later.usage.prompt_tokens > first.usage.prompt_tokens
    assert _selections(server) == before  # the image's kept rows came from the encoder cache
    # the check can fail: the same image asked with other words is selected (and counted) anew
    chat(client, server, [user_message("is there a dog on the grass ?", image)], 96)
    assert _selections(server) == before + 1


def test_three_turn_conversation_reuses_the_image_selection(client, server):
    image = scene(9)
    turns = [user_message("what colour is the umbrella ?", image)]
    first = chat(client, server, turns, 96)
    turns += [{"role": "assistant", "content": "it is red"}, {"role": "user", "content": "and the car ?"}]
    second = chat(client, server, turns, 96)
    turns += [{"role": "assistant", "content": "blue"}, {"role": "user", "content": "is there a dog ?"}]
    third = chat(client, server, turns, 96)
    assert first.usage.prompt_tokens < second.usage.prompt_tokens < third.usage.prompt_tokens
    # The image is selected once, for the turn that holds it; later turns hit its cached blocks (an image
    # re-selected for the latest question would change its hash and miss from position 2 on).
    assert cached_tokens(second) >= full_blocks(first.usage.prompt_tokens) >= 96
    assert cached_tokens(third) >= full_blocks(second.usage.prompt_tokens - 1)


def test_server_still_healthy_and_metrics_endpoint(server):
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "vllm:" in text
    assert server.alive()


def test_malformed_json_is_400(server):
    request = urllib.request.Request(
        f"{server.base_url}/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert "JSON" in json.loads(caught.value.read())["error"]["message"]
    assert server.alive()


def test_image_part_helper_roundtrip():
    part = image_part(scene(0))
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
