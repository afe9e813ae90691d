"""Real ``vllm serve`` with the plugin on a tiny Qwen3-VL-MoE (the Qwen3-VL tower and DeepStack, sparse-MoE LLM;
saved random float32 weights): the Qwen3-VL server tests, run against this server, and stock equality."""

from __future__ import annotations

import pytest
from test_qwen3_vl_server import (  # noqa: F401 - collected here, against this module's server
    ARGS,
    test_bad_values_are_400,
    test_every_selector_serves_images_and_videos,
    test_image_budgets_change_prompt_tokens_exactly,
    test_images_and_video_in_one_request_budget_per_item,
    test_metrics_count_tokens_before_and_after,
    test_no_budget_is_stock_vllm_token_for_token,
    test_video_budget_is_spread_over_frames_and_timestamps_stay,
)

from textscythe_dev.server import Served

pytestmark = pytest.mark.server

SERVED = Served("model_dir", ARGS, name="tiny-qwen3-vl-moe", timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-moe"), moe=True, with_weights=True)


def test_the_server_runs_the_moe_class(server):
    log = server.log_path.read_text(errors="replace")
    assert "Qwen3VLMoeForConditionalGeneration" in log and "visual token pruning enabled" in log
