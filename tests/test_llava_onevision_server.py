"""Real ``vllm serve`` with the plugin on a tiny LLaVA-OneVision (SigLIP tower, real any-resolution grid with
``anyres_max_9``, pooled video frames; saved random float32 weights), driven through the ``openai`` SDK, with chunked prefill
(``--max-num-batched-tokens 512``): images of several sizes, videos, several images and videos in one request,
bad values, newline rows never kept, and -- against a stock ``vllm serve`` (``VLLM_PLUGINS=``) on the same
saved weights -- requests without a budget identical token for token, with identical log-probabilities."""

from __future__ import annotations

import pytest
import torch

from textscythe_dev import tiny_onevision
from textscythe_dev.images import media_message as message
from textscythe_dev.images import scene, video_data_url
from textscythe_dev.offline import read_selection_log
from textscythe_dev.server import (
    BAD_VALUES,
    Served,
    assert_budget_prunes_each_item,
    assert_no_budget_is_stock,
    assert_refused,
    chat,
    counted_visual_tokens,
)

pytestmark = pytest.mark.server

QUESTION = "what is the dog doing next to the red car ?"
# saved random weights, float32: the image drives the logits, so "token for token" comparisons see the features
SERVER_ARGS = ["--dtype", "float32", "--seed", "0", "--max-model-len", "20000", "--max-num-batched-tokens", "512",
               "--limit-mm-per-prompt", '{"image": 3, "video": 2}']
# (width, height): a single 384 px view + tiles, a wide image, and one beyond 9 views' worth (down-sampled tiles)
SIZES = {"small": (336, 336), "wide": (800, 400), "large": (1600, 1200)}


def video_url(seed: int, num_frames: int = 4) -> str:
    return video_data_url(seed, num_frames=num_frames, width=168, height=112)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_onevision.build_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"), with_weights=True)


@pytest.fixture(scope="module")
def hf_processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


SERVED = Served("model_dir", tuple(SERVER_ARGS), name="tiny-onevision", env_fixture="selection_env", timeout=300)


def hf_image_tokens(hf_processor, image) -> int:
    """Visual tokens of one image according to the HF processor (independent of vLLM)."""
    ids = hf_processor(text="<image>", images=[image], return_tensors="pt")["input_ids"]
    return int((ids == tiny_onevision.vocabulary()["<image>"]).sum())


@pytest.mark.parametrize("name", list(SIZES))
def test_image_budgets_change_prompt_tokens_exactly(client, server, hf_processor, name):
    image = scene(11, *SIZES[name])
    image_tokens = hf_image_tokens(hf_processor, image)
    full = assert_budget_prunes_each_item(client, server, [message(QUESTION, images=[image])], [image_tokens],
                                          (1, 64, 729, image_tokens - 1, image_tokens, 100_000))
    assert 10 < full - image_tokens < 30  # the HF processor's count is the one vLLM serves without a budget


def test_video_budget_counts_the_whole_video(client, server):
    video_tokens = 4 * tiny_onevision.TOKENS_PER_FRAME + 1  # 4 pooled frames + the newline row
    assert_budget_prunes_each_item(client, server, [message(QUESTION, videos=[video_url(3)])], [video_tokens],
                                   (1, 100, 300, video_tokens - 1, video_tokens))


def test_images_and_videos_in_one_request_budget_per_item(client, server, hf_processor):
    small, large = scene(21, *SIZES["small"]), scene(22, *SIZES["large"])
    counts = [hf_image_tokens(hf_processor, small), hf_image_tokens(hf_processor, large),
              4 * tiny_onevision.TOKENS_PER_FRAME + 1]
    messages = [message(QUESTION, images=[small, large], videos=[video_url(4)])]
    assert_budget_prunes_each_item(client, server, messages, counts, (16, 800, 2000))
    for selector in ("textscythe", "cls_attention", "divprune", "visionzip", "uniform"):
        assert_budget_prunes_each_item(client, server, messages, counts, [32], visual_token_selector=selector)
    assert server.alive()


def test_newline_rows_are_never_kept(client, server, hf_processor, selection_log):
    from types import SimpleNamespace

    from textscythe_vllm.models.llava_onevision import image_layout

    config = tiny_onevision.build_config(len(tiny_onevision.vocabulary()))
    start = len(read_selection_log(selection_log))
    image = scene(31, *SIZES["wide"])
    processed = hf_processor(text="<image>", images=[image], return_tensors="pt")
    _, is_content = image_layout(SimpleNamespace(config=config), processed["image_sizes"][0],
                                 torch.zeros(processed["pixel_values"].shape[1], tiny_onevision.TOKENS_PER_VIEW))
    content = int(is_content.sum())
    for budget in (200, content):  # up to every content row: still no newline row
        chat(client, server, [message(QUESTION, images=[image])], budget, visual_token_selector="cls_attention")
    chat(client, server, [message(QUESTION, videos=[video_url(5)])], 4 * tiny_onevision.TOKENS_PER_FRAME)
    records = read_selection_log(selection_log)[start:]
    assert [record["budget"] for record in records] == [200, content, 4 * tiny_onevision.TOKENS_PER_FRAME]
    newline_positions = set((~is_content).nonzero().squeeze(1).tolist())
    assert len(newline_positions) > 10
    for record in records[:2]:
        assert record["num_tokens"] == is_content.shape[0]
        assert not newline_positions & set(record["kept_positions"])
    video = records[2]
    assert video["kept_positions"] == list(range(4 * tiny_onevision.TOKENS_PER_FRAME))  # all frames, no newline


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_400(client, server, field, value):
    assert_refused(client, server, [message(QUESTION, images=[scene(41, 336, 336)], videos=[video_url(6)])], field, value)


NO_BUDGET_CASES = {
    "small": lambda: [message(QUESTION, images=[scene(51, *SIZES["small"])])],
    "large": lambda: [message(QUESTION, images=[scene(52, *SIZES["large"])])],
    "video": lambda: [message(QUESTION, videos=[video_url(7)])],
    "mixed": lambda: [message(QUESTION, images=[scene(53, *SIZES["wide"]), scene(54, 500, 900)],
                              videos=[video_url(8)])],
}


def test_no_budget_is_stock_vllm_token_for_token(client, server, model_dir, tmp_path_factory):
    # controls: another image (and another video) moves the outputs far more than the tolerance, and a pruned
    # request differs from the stock output
    assert_no_budget_is_stock(
        client, server, model_dir, SERVER_ARGS, {name: build() for name, build in NO_BUDGET_CASES.items()},
        tmp_path_factory.mktemp("logs") / "stock.log",
        other_media={"large": [message(QUESTION, images=[scene(55, *SIZES["large"])])],
                     "video": [message(QUESTION, videos=[video_url(17)])]},
        pruned={"large": 16},
    )


def test_metrics_count_image_and_video_tokens_before_and_after(client, server, hf_processor):
    image = scene(61, *SIZES["wide"])
    both = [message(QUESTION, images=[image], videos=[video_url(9)])]
    counted = counted_visual_tokens(server, lambda: chat(client, server, both, 100))
    assert counted == (hf_image_tokens(hf_processor, image) + 4 * tiny_onevision.TOKENS_PER_FRAME + 1, 2 * 100)
