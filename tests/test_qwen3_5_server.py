"""Real ``vllm serve`` with the plugin on a tiny Qwen3.5 (the Qwen3-VL tower without DeepStack, a hybrid LLM: one
Gated-DeltaNet linear-attention layer, one full-attention layer). vLLM's CPU Gated-DeltaNet kernel runs in
bfloat16 only, so the server does too (saved random weights, cast): the Qwen3-VL budget, bad-value and metrics
tests run against it, and requests without a budget equal stock vLLM's token for token."""

from __future__ import annotations

import pytest
from test_qwen3_vl_server import (  # noqa: F401 - collected here, against this module's server
    CONVERSATIONS,
    QUESTION,
    _with_clip,
    message,
    test_bad_values_are_400,
    test_every_selector_serves_images_and_videos,
    test_image_budgets_change_prompt_tokens_exactly,
    test_images_and_video_in_one_request_budget_per_item,
    test_metrics_count_tokens_before_and_after,
    test_video_budget_is_spread_over_frames_and_timestamps_stay,
)

from textscythe_dev.images import scene
from textscythe_dev.server import (
    Served,
    assert_image_drives_outputs,
    assert_no_budget_is_stock,
    assert_same_outputs,
    greedy_with_logprobs,
)

pytestmark = pytest.mark.server

ARGS = ("--dtype", "bfloat16", "--seed", "0", "--max-num-batched-tokens", "128",
        "--limit-mm-per-prompt", '{"image": 2, "video": 2}')
SERVED = Served("model_dir", ARGS, name="tiny-qwen3.5", timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_5

    return build_tiny_qwen3_5(tmp_path_factory.mktemp("tiny-qwen3.5"), with_weights=True)


def test_the_server_runs_the_hybrid_class(server):
    log = server.log_path.read_text(errors="replace")
    assert "Qwen3_5ForConditionalGeneration" in log and "visual token pruning enabled" in log


def test_pruned_outputs_are_deterministic_and_follow_the_image(client, server, clip):
    def fingerprint(image_seed: int) -> tuple[int, list[tuple[str, float]]]:
        messages = [message(QUESTION, images=[scene(image_seed, 336, 224)], videos=[clip])]
        return greedy_with_logprobs(client, server.model_name, messages, max_tokens=6, visual_token_budget=20)

    first = fingerprint(20)
    assert_same_outputs(fingerprint(20), first)
    assert_image_drives_outputs(first, fingerprint(21))


def test_no_budget_is_stock_vllm_token_for_token(client, server, clip, model_dir, tmp_path):
    conversations = {name: _with_clip(conversation, clip) for name, conversation in CONVERSATIONS.items()}
    assert_no_budget_is_stock(client, server, model_dir, ARGS, conversations, tmp_path / "stock.log")
