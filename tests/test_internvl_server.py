"""Real ``vllm serve`` with the plugin on a tiny InternVL in the HF format (``InternVLForConditionalGeneration``,
served by vLLM's ``interns1.py``; saved random float32 weights), driven through the ``openai`` SDK: images with
tiles + thumbnail under one budget, videos whose budget is spread over the frames (per-frame quotas, ``Frame{i}:``
text kept), two images and a video in one request, every selector, bad values, the token metrics, and -- against
a stock ``vllm serve`` (``VLLM_PLUGINS=``) on the same weights -- requests without a budget identical token for
token, with identical log-probabilities. ``tests/test_internvl_chat_server.py`` runs the same tests on the chat
format (``InternVLChatModel``)."""

from __future__ import annotations

import pytest

from textscythe_dev import tiny_internvl
from textscythe_dev.images import media_message as message
from textscythe_dev.images import scene, video_data_url
from textscythe_dev.offline import read_selection_log
from textscythe_dev.server import (
    BAD_VALUES,
    Served,
    assert_budget_prunes_each_item,
    assert_no_budget_is_stock,
    assert_refused,
    counted_visual_tokens,
    prompt_tokens,
)
from textscythe_vllm.processing import spread_budget
from textscythe_vllm.selectors import available_selectors

pytestmark = pytest.mark.server

QUESTION = "what is the dog doing next to the red car ?"
TOKENS = tiny_internvl.TOKENS_PER_TILE  # 16 per tile / per frame
FRAMES = 4
VIDEO_TOKENS = FRAMES * TOKENS
# (width, height) -> tiles (+ thumbnail when more than one): 1 tile; 2 x 1 + thumbnail; 3 x 2 + thumbnail
SIZES = {"one-tile": (112, 112), "wide": (224, 112), "large": (336, 224)}
# saved random weights, float32: the image drives the logits, so "token for token" comparisons see the features
SERVER_ARGS = ("--dtype", "float32", "--seed", "0", "--limit-mm-per-prompt", '{"image": 2, "video": 1}')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_internvl.build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl-hf"), fmt="hf", with_weights=True)


SERVED = Served("model_dir", SERVER_ARGS, name="tiny-internvl", env_fixture="selection_env", timeout=300)


def video_url(seed: int) -> str:
    return video_data_url(seed, num_frames=FRAMES, width=112, height=112)


def image_tokens(image) -> int:
    """Visual tokens of one image according to transformers' InternVL processor (independent of vLLM)."""
    processor = tiny_internvl.build_processor(tiny_internvl.build_tokenizer())
    ids = processor(text="<IMG_CONTEXT>", images=[image], return_tensors="pt")["input_ids"]
    return int((ids == tiny_internvl.vocabulary()["<IMG_CONTEXT>"]).sum())


@pytest.mark.parametrize("name", list(SIZES))
def test_image_budget_counts_tiles_and_thumbnail(client, server, name):
    image = scene(11, *SIZES[name])
    count = image_tokens(image)
    assert count == {"one-tile": 1, "wide": 3, "large": 7}[name] * TOKENS
    full = assert_budget_prunes_each_item(client, server, [message(QUESTION, images=[image])], [count],
                                          (1, 5, TOKENS, count - 1, count, 100_000))
    assert 10 < full - count < 30  # transformers' count is the one vLLM serves without a budget


def test_video_budget_is_spread_over_frames(client, server, selection_log):
    messages = [message(QUESTION, videos=[video_url(3)])]
    start = len(read_selection_log(selection_log))
    budgets = (1, 5, 30, VIDEO_TOKENS - 1)
    full = assert_budget_prunes_each_item(client, server, messages, [VIDEO_TOKENS], budgets,
                                          visual_token_selector="cls_attention")
    assert prompt_tokens(client, server, messages, VIDEO_TOKENS) == full
    records = read_selection_log(selection_log)[start:]
    assert [record["budget"] for record in records] == list(budgets)
    for record in records:  # each frame keeps its quota, chosen within the frame
        per_frame = [sum(1 for p in record["kept_positions"] if f * TOKENS <= p < (f + 1) * TOKENS)
                     for f in range(FRAMES)]
        assert record["num_tokens"] == VIDEO_TOKENS
        assert per_frame == spread_budget(record["budget"], [TOKENS] * FRAMES)
    assert spread_budget(5, [TOKENS] * FRAMES) == [2, 1, 1, 1]


def test_two_images_and_a_video_budget_per_item(client, server):
    wide, large = scene(21, *SIZES["wide"]), scene(22, *SIZES["large"])
    counts = [image_tokens(wide), image_tokens(large), VIDEO_TOKENS]
    messages = [message(QUESTION, images=[wide, large], videos=[video_url(4)])]
    assert_budget_prunes_each_item(client, server, messages, counts, (3, 16, 50, 100))


@pytest.mark.parametrize("selector", available_selectors())
def test_every_selector(client, server, selector):
    counts = [image_tokens(scene(23, *SIZES["large"])), VIDEO_TOKENS]
    messages = [message(QUESTION, images=[scene(23, *SIZES["large"])], videos=[video_url(5)])]
    assert_budget_prunes_each_item(client, server, messages, counts, [20], visual_token_selector=selector)
    assert server.alive()


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_400(client, server, field, value):
    assert_refused(client, server, [message(QUESTION, images=[scene(41, *SIZES["wide"])], videos=[video_url(6)])], field, value)


NO_BUDGET_CASES = {
    "wide": lambda: [message(QUESTION, images=[scene(51, *SIZES["wide"])])],
    "large": lambda: [message(QUESTION, images=[scene(52, *SIZES["large"])])],
    "video": lambda: [message(QUESTION, videos=[video_url(7)])],
    "mixed": lambda: [message(QUESTION, images=[scene(53, *SIZES["wide"]), scene(54, *SIZES["one-tile"])],
                              videos=[video_url(8)])],
}


def test_no_budget_is_stock_vllm_token_for_token(request, client, server, model_dir, tmp_path_factory):
    # controls: another image (and another video) moves the outputs far more than the tolerance, and a pruned
    # request differs from the stock output
    assert_no_budget_is_stock(
        client, server, model_dir, request.module.SERVED.args,
        {name: build() for name, build in NO_BUDGET_CASES.items()}, tmp_path_factory.mktemp("logs") / "stock.log",
        other_media={"large": [message(QUESTION, images=[scene(55, *SIZES["large"])])],
                     "video": [message(QUESTION, videos=[video_url(17)])]},
        pruned={"large": 16},
    )


def test_metrics_count_image_and_video_tokens_before_and_after(client, server):
    image = scene(61, *SIZES["large"])
    both = [message(QUESTION, images=[image], videos=[video_url(9)])]
    counted = counted_visual_tokens(server, lambda: prompt_tokens(client, server, both, 30))
    assert counted == (image_tokens(image) + VIDEO_TOKENS, 2 * 30)
