"""Real ``vllm serve`` with the plugin on a tiny Gemma 4 (saved random float32 weights), driven through the ``openai``
SDK: images, a video (frames between ``mm:ss`` timestamps, each frame pruned to its share of the budget), two images
and a video in one request, bad values, every selector, the token counters of ``/metrics``, a server-wide
``max_soft_tokens`` composed with budgets, a request's ``max_soft_tokens`` (Gemma 4's own way to lower the
resolution, admitted up to the server's, as stock vLLM applies it; ``eval_openai.py``'s ``resolution`` baseline
uses it), and -- against a stock ``vllm serve`` (``VLLM_PLUGINS=``) on the same
saved weights -- requests without a budget identical token for token, with identical log-probabilities."""

from __future__ import annotations

import openai
import pytest

from textscythe_dev import tiny_gemma4
from textscythe_dev.images import data_url, scene, video_data_url
from textscythe_dev.images import media_message as message
from textscythe_dev.offline import read_selection_log
from textscythe_dev.server import (
    BAD_VALUES,
    Served,
    VLLMServer,
    assert_budget_prunes_each_item,
    assert_no_budget_is_stock,
    assert_refused,
    assert_same_outputs,
    chat,
    counted_visual_tokens,
    greedy_with_logprobs,
    outputs_of,
    prompt_tokens,
    run_eval_openai,
)
from textscythe_vllm.processing import spread_budget

pytestmark = pytest.mark.server

QUESTION = "what is the dog doing next to the red car ?"
SERVER_ARGS = ["--dtype", "float32", "--seed", "0", "--limit-mm-per-prompt", '{"image": 2, "video": 1}']
WIDE, SQUARE = (480, 336), (336, 336)  # 10 x 7 = 70 and 8 x 8 = 64 soft tokens at the checkpoint's 70
IMAGE_TOKENS = {WIDE: 70, SQUARE: 64}
NUM_FRAMES, FRAME_TOKENS = 4, 63  # 336 x 240 frames at vLLM's 70 per frame: 9 x 7 soft tokens each
VIDEO_TOKENS = NUM_FRAMES * FRAME_TOKENS
VOCAB = tiny_gemma4.vocabulary()
BOI, EOI, VIDEO = VOCAB[tiny_gemma4.BOI_TOKEN], VOCAB[tiny_gemma4.EOI_TOKEN], VOCAB[tiny_gemma4.VIDEO_TOKEN]


def video_url(seed: int) -> str:
    return video_data_url(seed, num_frames=NUM_FRAMES, width=336, height=240, fps=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # saved random weights, float32: the pixels drive the logits, so "token for token" comparisons see the features
    return tiny_gemma4.build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"), with_weights=True)


SERVED = Served("model_dir", tuple(SERVER_ARGS), name="tiny-gemma4", env_fixture="selection_env", timeout=300)


@pytest.fixture(scope="module")
def clip():
    return video_url(2)


def prompt_ids(client, server, messages, budget=None, **extra) -> list[int]:
    response = chat(client, server, messages, budget, return_token_ids=True, **extra)
    ids = response.model_extra["prompt_token_ids"]
    assert len(ids) == response.usage.prompt_tokens
    return ids


def frames_of(ids: list[int]) -> list[tuple[list[int], int]]:
    """Per video frame in a prompt: ``(the text tokens before its <|image>, its <|video|> count)``."""
    frames, text, start = [], [], None
    for index, token in enumerate(ids):
        if token == BOI and index + 1 < len(ids) and ids[index + 1] in (VIDEO, EOI):
            start = index
        elif token == EOI and start is not None:
            frames.append((text[-5:], ids[start + 1:index].count(VIDEO)))  # "mm:ss" is 5 word tokens
            start, text = None, []
        elif start is None:
            text.append(token)
    return frames


@pytest.mark.parametrize("size", [WIDE, SQUARE])
def test_image_budgets_change_prompt_tokens_exactly(client, server, size):
    messages, image_tokens = [message(QUESTION, images=[scene(11, *size)])], IMAGE_TOKENS[size]
    budgets = (1, 10, 63, image_tokens - 1, image_tokens, image_tokens + 1, 10_000)
    full = assert_budget_prunes_each_item(client, server, messages, [image_tokens], budgets)
    assert 10 < full - image_tokens < 30


def test_video_frames_keep_their_quota_and_timestamps(client, server, clip, selection_log):
    messages = [message(QUESTION, videos=[clip])]
    full = prompt_ids(client, server, messages)
    stock_frames = frames_of(full)
    assert [count for _, count in stock_frames] == [FRAME_TOKENS] * NUM_FRAMES
    timestamps = [text for text, _ in stock_frames]
    assert len(set(map(tuple, timestamps))) == NUM_FRAMES  # 00:00 .. 00:03
    for budget in (1, 10, 100, VIDEO_TOKENS - 1):
        start = len(read_selection_log(selection_log))
        ids = prompt_ids(client, server, messages, budget, visual_token_selector="textscythe")
        assert len(ids) == len(full) - VIDEO_TOKENS + budget
        quotas = spread_budget(budget, [FRAME_TOKENS] * NUM_FRAMES)
        # every frame keeps its timestamp and markers, with its own quota of placeholders
        assert frames_of(ids) == [(text, quota) for text, quota in zip(timestamps, quotas, strict=True)]
        (record,) = read_selection_log(selection_log)[start:]
        assert record["num_tokens"] == VIDEO_TOKENS and len(record["kept_positions"]) == budget
        per_frame = [sum(1 for p in record["kept_positions"] if frame * FRAME_TOKENS <= p < (frame + 1) * FRAME_TOKENS)
                     for frame in range(NUM_FRAMES)]
        assert per_frame == quotas  # each frame's rows chosen within it
    assert prompt_tokens(client, server, messages, VIDEO_TOKENS) == len(full)


def test_two_images_and_a_video_in_one_request_budget_per_item(client, server, clip):
    messages = [message(QUESTION, images=[scene(21, *WIDE), scene(22, *SQUARE)], videos=[clip])]
    assert_budget_prunes_each_item(client, server, messages, [70, 64, VIDEO_TOKENS], (5, 50, 64, 100))
    assert server.alive()


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_values_are_400(client, server, clip, field, value):
    assert_refused(client, server, [message(QUESTION, images=[scene(41, *WIDE)], videos=[clip])], field, value)


def test_every_selector_serves_images_and_videos(client, server, clip):
    from textscythe_vllm.selectors import available_selectors

    messages = [message(QUESTION, images=[scene(7, *WIDE)], videos=[clip])]
    for selector in available_selectors():
        assert_budget_prunes_each_item(client, server, messages, [70, VIDEO_TOKENS], [12],
                                       visual_token_selector=selector)
    assert server.alive()


def test_request_max_soft_tokens_above_the_servers_is_refused(client, server):
    """Gemma 4's own per-request resolution may not raise the server's (the checkpoint's 70 here): 400 naming it,
    the server stays up; the server's own value is accepted, and the nested form Gemma 4 also reads is dropped."""
    messages = [message(QUESTION, images=[scene(12, *WIDE)])]
    full = prompt_tokens(client, server, messages)
    assert prompt_tokens(client, server, messages, mm_processor_kwargs={"max_soft_tokens": 70}) == full
    assert prompt_tokens(client, server, messages, 10, mm_processor_kwargs={"max_soft_tokens": 70}) == full - 60
    assert prompt_tokens(client, server, messages, mm_processor_kwargs={"images_kwargs": {"max_soft_tokens": 140}}) \
        == full
    for value in (140, 280, 1120, 100, "70", 70.5, True):
        with pytest.raises(openai.BadRequestError, match=r"'max_soft_tokens' must be one of \[70\]"):
            chat(client, server, messages, mm_processor_kwargs={"max_soft_tokens": value})
    assert server.alive()


NO_BUDGET_CASES = {
    "wide": lambda: [message(QUESTION, images=[scene(51, *WIDE)])],
    "video": lambda: [message(QUESTION, videos=[video_url(7)])],
    "mixed": lambda: [message(QUESTION, images=[scene(53, *WIDE), scene(54, *SQUARE)], videos=[video_url(8)])],
}


def test_no_budget_is_stock_vllm_token_for_token(client, server, model_dir, tmp_path_factory):
    # controls: another image (and another video) moves the outputs far more than the tolerance, and a pruned
    # request differs from the stock output
    assert_no_budget_is_stock(
        client, server, model_dir, SERVER_ARGS, {name: build() for name, build in NO_BUDGET_CASES.items()},
        tmp_path_factory.mktemp("logs") / "stock.log",
        other_media={"wide": [message(QUESTION, images=[scene(55, *WIDE)])],
                     "video": [message(QUESTION, videos=[video_url(17)])]},
        pruned={"wide": 16},
    )



def test_metrics_count_image_and_video_tokens_before_and_after(client, server, clip):
    both = [message(QUESTION, images=[scene(61, *WIDE), scene(62, *SQUARE)], videos=[clip])]
    counted = counted_visual_tokens(server, lambda: chat(client, server, both, 66))
    assert counted == (70 + 64 + VIDEO_TOKENS, 66 + 64 + 66)


@pytest.fixture(scope="module")
def wide(model_dir, tmp_path_factory):
    """A second server whose operator set ``--mm-processor-kwargs '{"max_soft_tokens": 140}'``."""
    log = tmp_path_factory.mktemp("logs") / "vllm-max-soft-tokens.log"
    with VLLMServer(model_dir, WIDE_ARGS, log_path=log, served_model_name="tiny-gemma4-140") as served:
        yield served


@pytest.fixture(scope="module")
def wide_client(wide):
    return openai.OpenAI(base_url=f"{wide.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


WIDE_ARGS = [*SERVER_ARGS, "--mm-processor-kwargs", '{"max_soft_tokens": 140}']
AT_70 = {"mm_processor_kwargs": {"max_soft_tokens": 70}}


def test_server_wide_max_soft_tokens_composes_with_budgets(wide, wide_client):
    """The server's ``max_soft_tokens`` (140) gives every image up to 140 soft tokens (video frames stay at vLLM's
    70); a budget then prunes those, and the counters count them."""
    image = [message(QUESTION, images=[scene(71, *WIDE)])]
    text = prompt_tokens(wide_client, wide, [message(QUESTION)])
    full = prompt_tokens(wide_client, wide, image)
    image_tokens = full - text - 2  # <|image> and <image|> around the soft tokens
    assert image_tokens == 126  # 480 x 336 px at 140: resized to 672 x 432 px, 14 x 9 soft tokens
    assert_budget_prunes_each_item(wide_client, wide, image, [image_tokens], (10, 70, image_tokens - 1, 500))
    video = [message(QUESTION, videos=[video_url(3)])]
    assert prompt_tokens(wide_client, wide, video) - prompt_tokens(wide_client, wide, video, 10) == VIDEO_TOKENS - 10
    assert counted_visual_tokens(wide, lambda: chat(wide_client, wide, image, 30)) == (126, 30)


def test_request_max_soft_tokens_lowers_the_resolution_as_stock_vllm(wide, wide_client, model_dir, tmp_path_factory):
    """A request's ``max_soft_tokens`` at or below the server's reaches Gemma 4 as it does in stock vLLM (the same
    prompt, tokens and log-probabilities as a stock server given the same request); budgets prune what it gives,
    the counters count it, and a value above the server's is refused."""
    image = [message(QUESTION, images=[scene(72, *WIDE)])]
    full = prompt_tokens(wide_client, wide, image)
    lowered = prompt_tokens(wide_client, wide, image, **AT_70)
    assert full - lowered == 126 - 70  # 480 x 336 px at 70: 10 x 7 soft tokens
    assert prompt_tokens(wide_client, wide, image, 10, **AT_70) == lowered - 60
    assert prompt_tokens(wide_client, wide, image, mm_processor_kwargs={"max_soft_tokens": 140}) == full
    assert counted_visual_tokens(wide, lambda: chat(wide_client, wide, image, 30, **AT_70)) == (70, 30)
    for value in (280, 1120):
        with pytest.raises(openai.BadRequestError, match=r"must be one of \[70, 140\]"):
            chat(wide_client, wide, image, mm_processor_kwargs={"max_soft_tokens": value})
    ours = greedy_with_logprobs(wide_client, wide.model_name, image, **AT_70)
    log = tmp_path_factory.mktemp("logs") / "stock-max-soft-tokens.log"
    with VLLMServer(model_dir, [*WIDE_ARGS, "--trust-request-mm-kwargs"], env={"VLLM_PLUGINS": ""}, log_path=log,
                    with_middleware=False, served_model_name="stock") as stock:
        stock_client = openai.OpenAI(base_url=f"{stock.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        theirs = greedy_with_logprobs(stock_client, stock.model_name, image, **AT_70)
        unlowered = greedy_with_logprobs(stock_client, stock.model_name, image)
    assert "visual token pruning enabled" not in log.read_text()
    assert_same_outputs(ours, theirs)
    assert unlowered[0] == full and theirs[0] == lowered  # control: stock honours the option too


def test_one_batch_at_two_resolutions_selects_as_alone(wide, wide_client):
    """Images at 70 and at 140 soft tokens pad to different patch counts, so the encoder gets them as separate
    shapes in one batch: sent together, every request keeps the rows it keeps alone (attention matched to its
    image, no fallback), so its tokens and log-probabilities are those it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [(seed, AT_70 if seed % 2 else {}) for seed in range(90, 96)]

    def ask(seed: int, options: dict, uuid: str | None = None):
        part = {"type": "image_url", "image_url": {"url": data_url(scene(seed, *WIDE))}}
        if uuid is not None:  # a fresh cache key: encoded and selected again, not read from the encoder cache
            part["uuid"] = uuid
        messages = [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]
        return outputs_of(chat(wide_client, wide, messages, 20, 4, logprobs=True,
                               visual_token_selector="cls_attention", **options))

    alone = [ask(seed, options) for seed, options in requests]
    start = wide.log_path.stat().st_size
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: ask(*request, uuid=f"batch-{request[0]}"), requests))
    for ours, solo in zip(together, alone, strict=True):
        assert_same_outputs(ours, solo)
    assert "do not match" not in wide.log_path.read_bytes()[start:].decode(errors="replace")
    assert len({outputs[0] for outputs in alone}) == 1  # 20 kept of 70 or of 126: the same prompt length


def test_eval_openai_resolution_baseline_uses_max_soft_tokens(wide, tmp_path):
    """``eval_openai.py``'s ``resolution`` baseline on Gemma 4, whose token count does not follow the image size:
    it sends Gemma 4's own ``max_soft_tokens`` (the largest the server admits that fits), so ``resolution@70``
    has exactly the prompt of ``textscythe@70`` for an image of 70 soft tokens at 70. The 697 x 409 image has 135
    soft tokens at 140 but a 28 px copy of it 120 (Gemma 4 rounds each side to 48 px steps after scaling it to
    the budget): at budget 125 the baseline must not send that thumbnail but the image at 70 (60 soft tokens)."""
    run = run_eval_openai(wide, tmp_path, ["--model", wide.model_name, "--budgets", "none,125,70,20", "--selectors",
                                           "textscythe,resolution", "--max-tokens", "2", "--concurrency", "2",
                                           "--no-plot"], [scene(80, *WIDE), scene(81, 697, 409)], QUESTION)
    rows, tokens = run.rows, run.prompt_tokens
    assert tokens[("resolution@70", 0)] == tokens[("textscythe@70", 0)] < tokens[("none", 0)]
    assert tokens[("resolution@70", 1)] == tokens[("textscythe@70", 1)] - 10  # 60 soft tokens at 70
    for index in range(2):  # both at 70: 140 gives 126 / 135 soft tokens
        assert tokens[("resolution@125", index)] == tokens[("resolution@70", index)]
    # no value of Gemma 4's reaches 20 soft tokens: reported as errors saying why, not sent at full resolution
    assert (rows["resolution@20"]["samples"], rows["resolution@20"]["errors"]) == (2, 2)
    assert "does not follow the resolution" in run.report["first_errors"][0]
    assert rows["resolution@70"]["errors"] == rows["resolution@125"]["errors"] == 0
