"""Real ``vllm serve`` with the plugin on a tiny LLaVA-NeXT (anyres): the budget covers base view + tiles."""

from __future__ import annotations

import openai
import pytest

from textscythe_dev.images import scene, user_message
from textscythe_dev.server import (
    Served,
    assert_budget_prunes_each_item,
    assert_no_budget_is_stock,
    prompt_tokens,
)

pytestmark = pytest.mark.server
QUESTION = "what colour is the umbrella ?"
# saved random weights, float32: the image drives the logits, so "token for token" comparisons see the features
SERVER_ARGS = ["--dtype", "float32", "--seed", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from textscythe_dev.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-next-weights"), kind="llava-next", with_weights=True)


SERVED = Served("model_dir", tuple(SERVER_ARGS), name="tiny-llava-next")


def text_only_tokens(client, server) -> int:
    return prompt_tokens(client, server, [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])


@pytest.mark.parametrize("size", [(336, 336), (672, 336), (672, 672)])
def test_budget_counts_the_whole_anyres_image(client, server, size):
    messages = [user_message(QUESTION, scene(11, *size))]
    image_tokens = prompt_tokens(client, server, messages) - text_only_tokens(client, server)
    assert image_tokens > 576  # base view + tiles + newline rows
    assert_budget_prunes_each_item(client, server, messages, [image_tokens], (1, 64, 320, image_tokens))
    assert_budget_prunes_each_item(client, server, messages, [image_tokens], [320], visual_token_selector="visionzip")


def test_high_resolution_image_reaches_llava_next_scale(client, server):
    messages = [user_message(QUESTION, scene(12, 672, 672))]
    image_tokens = prompt_tokens(client, server, messages) - text_only_tokens(client, server)
    assert image_tokens >= 2880  # 672x672 with 2x2 tiles: 5 views x 576 + newline rows
    assert prompt_tokens(client, server, messages, 320) == prompt_tokens(client, server, messages) - image_tokens + 320


def test_bad_budget_is_400_and_server_lives(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        prompt_tokens(client, server, [user_message(QUESTION, scene(13))], -5)
    assert caught.value.body["param"] == "visual_token_budget"
    assert server.alive()


def test_no_budget_is_stock_vllm_token_for_token(client, server, model_dir, tmp_path_factory):
    conversations = {
        "square": [user_message(QUESTION, scene(21, 336, 336))],
        "wide": [user_message(QUESTION, scene(22, 672, 336))],
        "large": [user_message(QUESTION, scene(23, 672, 672))],
    }
    # controls: another picture of the same size moves the outputs far more than the tolerance, and a pruned
    # request differs from the stock output
    assert_no_budget_is_stock(client, server, model_dir, SERVER_ARGS, conversations,
                              tmp_path_factory.mktemp("logs") / "stock-next.log",
                              other_media={"large": [user_message(QUESTION, scene(24, 672, 672))]}, pruned={"large": 64})


def test_explanation_lays_out_base_view_tiles_and_newlines(client, server):
    """The explain route gives each kept row's place in the base view / tiles (newline rows marked -1), which is
    what textscythe-draw needs; no newline row is kept while image rows remain."""
    import httpx

    response = client.chat.completions.create(
        model=server.model_name, messages=[user_message(QUESTION, scene(25, 672, 672))], max_tokens=1,
        temperature=0.0, extra_body={"visual_token_budget": 320, "visual_token_explain": True},
    )
    record = httpx.get(f"{server.base_url}/v1/textscythe/explanations/{response.id}", timeout=30).json()
    (item,) = record["items"]
    layout = item["layout"]
    assert layout["kind"] == "views" and layout["views"] == 5 and layout["view_rows"] == layout["view_cols"] == 24
    assert len(layout["row_to_patch"]) == item["num_tokens"] > 2880  # 2,880 patch rows + newline rows
    patches = [p for p in layout["row_to_patch"] if p >= 0]
    assert len(set(patches)) == len(patches) and min(patches) >= 0 and max(patches) < 5 * 576  # one row per patch
    assert item["kept"] == 320 and all(layout["row_to_patch"][position] >= 0 for position in item["kept_positions"])
