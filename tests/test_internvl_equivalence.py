"""Pruned InternVL in vLLM against an independent transformers reference, for both formats vLLM serves: images,
videos, and an image with a video in one request.

The tiny builder gives the HF format (``InternVLForConditionalGeneration``) and the chat format
(``InternVLChatModel``) the same random float32 weights. Each format is served by a real ``vllm serve`` with the
plugin (one at a time), which writes every pruned item's kept positions to ``$TEXTSCYTHE_SELECTION_LOG``. The
reference is transformers' ``InternVLForConditionalGeneration`` (eager attention) on the HF-format directory:

* the visual rows of the image (2 x 1 tiles + thumbnail) and of each video frame (one tile per frame) from
  transformers' ``get_image_features``, and the [CLS] attention per token from its tower's last layer
  (``output_attentions``), laid out over the tokens by the pixel-shuffle rule written out here (v2: token
  ``(r, c)`` packs patches ``(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)``);
* the selection, made here with the plugin's selector on those rows, that attention and the user message's words
  (the image as one run; a video frame by frame with :func:`~textscythe_vllm.processing.spread_budget` quotas)
  -- compared with the kept positions the server logged;
* the pruned prompt, written here: the format's chat template with the image expanded to ``<img>`` + K context
  tokens + ``</img>`` and the video to ``Frame{i}: <img>`` + its frame's quota + ``</img>`` per frame (the frame
  text kept; frames filled with ``<video>`` in the HF format, ``<|video_pad|>`` in the chat format, which vLLM
  serves videos for only because this LLM is a Qwen2 whose vocabulary has that token) -- compared with the prompt
  ids the server reports (``return_token_ids``), and, unpruned, with transformers' own expansion;
* greedy decoding from that prompt, without a KV cache, with the kept rows (from the log) at the context tokens
  (1-D positions, consecutive, as vLLM gives them).

Compared per format and case: prompt ids, greedy token ids (identical), log-probabilities (within
:data:`LOGPROB_ATOL`), kept positions. Controls: another choice of rows of the same size (the other selector's for
the image, each frame's first quota for the video) moves the log-probabilities far beyond the tolerance.

Pixel values: transformers' processors, for both formats. For the image, vLLM's chat-format preprocessing resizes
with torchvision where transformers uses PIL; the image (tiles cut from a 224 x 112 picture without resizing, one
thumbnail resize) is chosen so the two agree to ~2.4e-7. For the video, the frames are the mp4 decoded by vLLM's
own loader (checked equal to a plain OpenCV decode: all 4 frames, none sampled away), 112 x 112 so that neither
format resizes them; both formats' preprocessing of those frames agree to ~2.4e-7. Each agreement is checked
below.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from textscythe_dev import tiny_internvl
from textscythe_dev.images import decoded_frames, media_message, scene, video_data_url
from textscythe_dev.offline import read_selection_log
from textscythe_dev.reference import largest_difference, user_message_instructions
from textscythe_dev.server import VLLMServer
from textscythe_vllm.processing import spread_budget
from textscythe_vllm.pruning import SELECTION_LOG_ENV
from textscythe_vllm.selectors import get_selector

pytestmark = pytest.mark.server

QUESTION = "what is the dog doing next to the red car ?"
IMAGE = scene(71, 224, 112)  # 2 x 1 tiles + the thumbnail
IMAGE_TOKENS = 3 * tiny_internvl.TOKENS_PER_TILE
FRAMES = 4
FRAME_TOKENS = tiny_internvl.TOKENS_PER_TILE  # one tile per frame
VIDEO_TOKENS = FRAMES * FRAME_TOKENS
MAX_TOKENS = 4
# float32 on both sides (transformers eager, vLLM CPU kernels): observed differences are ~1e-6
LOGPROB_ATOL = 1e-4
# the image's and the video's visual token counts differ, which tells their selection-log records apart
COUNTS = {"image": IMAGE_TOKENS, "video": VIDEO_TOKENS}


@dataclass(frozen=True)
class Case:
    id: str
    media: tuple[str, ...]  # in the message's order: the image first
    budget: int | None = None
    selector: str = "textscythe"


CASES = [
    Case("image-full", ("image",)),
    *(Case(f"image-{selector}-{budget}", ("image",), budget, selector)
      for selector, budgets in (("textscythe", (5, 20)), ("cls_attention", (5, 20, 47))) for budget in budgets),
    Case("video-full", ("video",)),
    Case("video-textscythe-3", ("video",), 3),  # quotas 1, 1, 1, 0: the last frame keeps only its text and markers
    Case("video-textscythe-6", ("video",), 6),  # quotas 2, 2, 1, 1
    Case("video-textscythe-30", ("video",), 30),
    # cls_attention's budgets cut every frame between distinct attention values: flat background patches tie (the
    # second frame is mostly background), and a cut inside a tie has no single right answer
    Case("video-cls_attention-6", ("video",), 6, "cls_attention"),
    Case("video-cls_attention-53", ("video",), 53, "cls_attention"),
    Case("both-textscythe-12", ("image", "video"), 12),
    Case("both-cls_attention-10", ("image", "video"), 10, "cls_attention"),
]
BY_ID = {case.id: case for case in CASES}


@cache
def video_url() -> str:
    """An mp4 of :data:`FRAMES` frames of one tile's size: no resize in either format's video preprocessing, and
    fewer frames than vLLM samples by default, so none is dropped. Made once: server and reference see the same
    bytes."""
    return video_data_url(3, num_frames=FRAMES, width=tiny_internvl.IMAGE_SIZE, height=tiny_internvl.IMAGE_SIZE)


def message(case: Case) -> dict[str, Any]:
    return media_message(QUESTION, images=[IMAGE] if "image" in case.media else [],
                         videos=[video_url()] if "video" in case.media else [])


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


def vllm_frames() -> tuple[np.ndarray, dict[str, Any]]:
    """The clip as the server decodes it: vLLM's configured video loader with ``VideoMediaIO``'s frame count."""
    import inspect

    from vllm import envs
    from vllm.multimodal.media.video import VideoMediaIO
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    num_frames = inspect.signature(VideoMediaIO.__init__).parameters["num_frames"].default
    loader = VIDEO_LOADER_REGISTRY.load(envs.VLLM_VIDEO_LOADER_BACKEND)
    return loader.load_bytes(base64.b64decode(video_url().split(",", 1)[1]), num_frames=num_frames)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return vllm_frames()[0]


def video_pixel_values(frames: np.ndarray) -> torch.Tensor:
    """``[frames, 3, 112, 112]``: transformers' video preprocessing (what the HF format runs) of ``frames``."""
    processor = tiny_internvl.build_processor(tiny_internvl.build_tokenizer())
    return processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]


def test_both_preprocessings_agree_on_this_image():
    from vllm.transformers_utils.processors.internvl import image_to_pixel_values_internvl

    chat = image_to_pixel_values_internvl(IMAGE, input_size=tiny_internvl.IMAGE_SIZE, min_num=1,
                                          max_num=tiny_internvl.MAX_DYNAMIC_PATCH, use_thumbnail=True)
    assert chat.shape == pixel_values().shape == (3, 3, tiny_internvl.IMAGE_SIZE, tiny_internvl.IMAGE_SIZE)
    torch.testing.assert_close(chat, pixel_values(), atol=1e-6, rtol=0)


def test_the_server_decodes_every_frame_of_the_clip():
    """The reference's frames are the server's: vLLM's loader gives exactly OpenCV's frames, all of them."""
    decoded, metadata = vllm_frames()
    assert decoded.shape == (FRAMES, tiny_internvl.IMAGE_SIZE, tiny_internvl.IMAGE_SIZE, 3)
    assert metadata["frames_indices"] == list(range(FRAMES))
    np.testing.assert_array_equal(decoded, np.stack(decoded_frames(base64.b64decode(video_url().split(",", 1)[1]))))


def test_both_preprocessings_agree_on_these_frames(frames):
    from vllm.transformers_utils.processors.internvl import video_to_pixel_values_internvl

    chat = video_to_pixel_values_internvl(frames, input_size=tiny_internvl.IMAGE_SIZE, min_num=1, max_num=1,
                                          use_thumbnail=False)
    expected = video_pixel_values(frames)
    assert chat.shape == expected.shape == (FRAMES, 3, tiny_internvl.IMAGE_SIZE, tiny_internvl.IMAGE_SIZE)
    torch.testing.assert_close(chat, expected, atol=1e-6, rtol=0)


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


@pytest.fixture(scope="module")
def visual(hf_model, frames) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Per modality: ``(rows, [CLS] attention per row, segment sizes)`` -- the image is one segment, a video has
    one per frame."""
    image = image_rows(hf_model, pixel_values())
    video = image_rows(hf_model, video_pixel_values(frames))
    return {"image": (*image, [IMAGE_TOKENS]), "video": (*video, [FRAME_TOKENS] * FRAMES)}


def template_text(case: Case, fmt: str) -> str:
    parts = [{"type": modality} for modality in case.media]
    return tiny_internvl.build_tokenizer(fmt).apply_chat_template(
        [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}], tokenize=False,
        add_generation_prompt=True)


def template_ids(case: Case, fmt: str) -> list[int]:
    return tiny_internvl.build_tokenizer(fmt).encode(template_text(case, fmt), add_special_tokens=False)


def instruction(case: Case, fmt: str) -> list[int]:
    """The words of the user message holding the media (docs/how-it-works.md, "The instruction")."""
    tokenizer = tiny_internvl.build_tokenizer(fmt)
    vocab = tiny_internvl.vocabulary()
    pads = {vocab[tiny_internvl.IMG_CONTEXT if fmt == "hf" else tiny_internvl.IMAGE_TOKEN],
            vocab[tiny_internvl.VIDEO_TOKEN]}
    (words, *others) = user_message_instructions(
        template_ids(case, fmt), tokenizer.encode("<|im_start|>user", add_special_tokens=False),
        tokenizer.encode(tiny_internvl.IM_END, add_special_tokens=False), pads, {*tokenizer.all_special_ids, *pads})
    assert all(other == words for other in others)
    return words


def context_ids(fmt: str) -> dict[str, int]:
    """The token each visual row stands in, per modality (vLLM's chat format fills video frames with
    ``<|video_pad|>``, the HF format with ``<video>``)."""
    vocab = tiny_internvl.vocabulary()
    video = tiny_internvl.VIDEO_TOKEN if fmt == "hf" else tiny_internvl.VIDEO_PAD
    return {"image": vocab[tiny_internvl.IMG_CONTEXT], "video": vocab[video]}


def pruned_prompt(case: Case, fmt: str, kept: dict[str, list[int]]) -> list[int]:
    """The template's ids with the image expanded to its kept count and the video, frame by frame, to
    ``Frame{i}:`` and its frame's quota (a frame whose quota is 0 keeps its text and markers)."""
    tokenizer = tiny_internvl.build_tokenizer(fmt)
    vocab = tiny_internvl.vocabulary()
    start, end = vocab[tiny_internvl.IMG_START], vocab[tiny_internvl.IMG_END]
    image = vocab[tiny_internvl.IMG_CONTEXT if fmt == "hf" else tiny_internvl.IMAGE_TOKEN]
    context = context_ids(fmt)
    ids = []
    for token in template_ids(case, fmt):
        if token == image:
            ids += [start, *[context["image"]] * len(kept["image"]), end]
        elif token == vocab[tiny_internvl.VIDEO_TOKEN]:
            for frame, quota in enumerate(spread_budget(len(kept["video"]), [FRAME_TOKENS] * FRAMES)):
                # the HF format joins frames with a newline (as transformers does), the chat format with nothing;
                # this tokenizer drops whitespace, a real one would not
                separator = "\n" if frame and fmt == "hf" else ""
                ids += tokenizer.encode(f"{separator}Frame{frame + 1}: ", add_special_tokens=False)
                ids += [start, *[context["video"]] * quota, end]
        else:
            ids.append(token)
    return ids


def test_written_video_prompt_is_transformers_processors(frames):
    """Unpruned, the written video prompt is transformers' own expansion (which fills the frames with the image
    context token, vLLM's HF format then with ``<video>``)."""
    case = BY_ID["video-full"]
    tokenizer = tiny_internvl.build_tokenizer("hf")
    processor = tiny_internvl.build_processor(tokenizer)
    ids = processor(text=[template_text(case, "hf")], videos=[frames], return_tensors="pt")["input_ids"][0]
    vocab = tiny_internvl.vocabulary()
    ids[ids == vocab[tiny_internvl.IMG_CONTEXT]] = vocab[tiny_internvl.VIDEO_TOKEN]
    assert ids.tolist() == pruned_prompt(case, "hf", {"video": list(range(VIDEO_TOKENS))})


@torch.no_grad()
def select(visual, modality: str, budget: int | None, selector: str, words: list[int], hf_model) -> list[int]:
    """The reference's selection: the selector on transformers' rows and attention, within each segment with
    its :func:`spread_budget` quota."""
    rows, attention, segments = visual[modality]
    if budget is None or budget >= rows.shape[0]:
        return list(range(rows.shape[0]))
    text = hf_model.get_input_embeddings()(torch.tensor(words, dtype=torch.long))
    kept, offset = [], 0
    for size, quota in zip(segments, spread_budget(budget, segments), strict=True):
        if quota:
            part = slice(offset, offset + size)
            kept += (get_selector(selector).select(rows[part], text, attention[part], quota).indices + offset).tolist()
        offset += size
    return kept


@torch.no_grad()
def reference(hf_model, ids: list[int], rows: torch.Tensor, context: dict[str, int]) -> tuple[list[int], list[float]]:
    """``(greedy tokens, their log-probabilities)`` from ``ids`` with ``rows`` at the context tokens, in order."""
    table = hf_model.get_input_embeddings()
    prompt = torch.tensor(ids, dtype=torch.long)
    embeds = table(prompt)
    slots = torch.isin(prompt, torch.tensor(list(context.values())))
    assert int(slots.sum()) == rows.shape[0]
    embeds[slots] = rows
    tokens, logprobs = [], []
    for _ in range(MAX_TOKENS):
        logits = hf_model(inputs_embeds=embeds[None], use_cache=False).logits[0, -1].float()
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        embeds = torch.cat([embeds, table(torch.tensor([token]))])
    return tokens, logprobs


@pytest.fixture(scope="module", params=tiny_internvl.FORMATS)
def served(request, weights, tmp_path_factory) -> dict[str, Any]:
    """One format's server answers every case (greedy, with log-probabilities and prompt ids); its selection log
    alongside."""
    import openai

    fmt = request.param
    workdir = tmp_path_factory.mktemp(f"equivalence-{fmt}")
    log = workdir / "selections.jsonl"
    args = ["--dtype", "float32", "--seed", "0", "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    args += ["--trust-remote-code"] if fmt == "chat" else []
    results = {}
    with VLLMServer(weights[fmt], args, env={SELECTION_LOG_ENV: str(log)}, log_path=workdir / "vllm.log",
                    served_model_name=f"internvl-{fmt}") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        for case in CASES:
            done = len(read_selection_log(log))
            extra: dict[str, Any] = {"return_token_ids": True, "return_tokens_as_token_ids": True}
            if case.budget is not None:
                extra |= {"visual_token_budget": case.budget, "visual_token_selector": case.selector}
            response = client.chat.completions.create(
                model=server.model_name, messages=[message(case)], max_tokens=MAX_TOKENS, temperature=0.0,
                logprobs=True, extra_body=extra)
            records = read_selection_log(log)[done:]
            content = response.choices[0].logprobs.content  # tokens as "token_id:<id>"
            results[case.id] = {
                "prompt_tokens": response.usage.prompt_tokens,
                "prompt_token_ids": response.model_extra["prompt_token_ids"],
                "tokens": [int(entry.token.split(":")[1]) for entry in content],
                "logprobs": [entry.logprob for entry in content],
                "records": records,
            }
    return {"fmt": fmt, "results": results}


def kept_positions(case: Case, result: dict[str, Any]) -> dict[str, list[int]]:
    """Per modality of the case: the kept positions its selection-log record gives (all, unpruned)."""
    records = {}
    for record in result["records"]:
        (modality,) = [m for m in case.media if COUNTS[m] == record["num_tokens"]]
        assert modality not in records and record["budget"] == case.budget and record["selector"] == case.selector
        records[modality] = record
    assert set(records) == {m for m in case.media if case.budget is not None and case.budget < COUNTS[m]}
    return {m: records[m]["kept_positions"] if m in records else list(range(COUNTS[m])) for m in case.media}


def frame_counts(kept: list[int]) -> list[int]:
    return [sum(1 for p in kept if f * FRAME_TOKENS <= p < (f + 1) * FRAME_TOKENS) for f in range(FRAMES)]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_server_matches_transformers_fed_the_kept_rows(served, hf_model, visual, case):
    fmt, result = served["fmt"], served["results"][case.id]
    kept = kept_positions(case, result)
    words = instruction(case, fmt)
    for modality, positions in kept.items():
        assert len(positions) == min(case.budget or COUNTS[modality], COUNTS[modality])
        assert positions == sorted(set(positions))
        if modality == "video":  # each frame keeps its quota, chosen within the frame
            assert frame_counts(positions) == spread_budget(len(positions), [FRAME_TOKENS] * FRAMES)
        assert positions == select(visual, modality, case.budget, case.selector, words, hf_model), modality
    assert all(record["instruction_tokens"] == len(words) for record in result["records"])
    ids = pruned_prompt(case, fmt, kept)
    assert result["prompt_token_ids"] == ids
    assert result["prompt_tokens"] == len(ids)
    rows = torch.cat([visual[modality][0][positions] for modality, positions in kept.items()])
    tokens, logprobs = reference(hf_model, ids, rows, context_ids(fmt))
    assert result["tokens"] == tokens
    difference = largest_difference(result["logprobs"], logprobs)
    print(f"{fmt} {case.id}: prompt tokens {len(ids)}, max |logprob difference| {difference:.2e}")
    assert difference <= LOGPROB_ATOL


@pytest.mark.parametrize("case", [case for case in CASES if case.selector == "cls_attention" and case.budget],
                         ids=lambda case: case.id)
def test_cls_attention_keeps_transformers_top_attention_tokens(served, visual, case):
    """``cls_attention``'s kept positions are the top-K of transformers' own [CLS] attention, within the image and
    within each video frame (its quota) -- the whole probe path, end to end."""
    kept = kept_positions(case, served["results"][case.id])
    for modality, positions in kept.items():
        _, attention, segments = visual[modality]
        expected, offset = [], 0
        for size, quota in zip(segments, spread_budget(len(positions), segments), strict=True):
            scores = attention[offset:offset + size]
            ranked = torch.argsort(-scores, stable=True)
            if 0 < quota < size:  # no near-tie at the cut: the top-K is well defined at float32 agreement
                assert float(scores[ranked[quota - 1]] - scores[ranked[quota]]) > 1e-6
            expected += sorted((ranked[:quota] + offset).tolist())
            offset += size
        assert positions == expected, modality


def logprob_gap(result: dict[str, Any], other: list[float]) -> float:
    return largest_difference(result["logprobs"], other)


def test_comparisons_can_tell_selections_apart(served, hf_model, visual):
    """Guards against a vacuous pass: another selection of the same size moves the log-probabilities far beyond
    the tolerance -- for the image the other selector's rows, for the video each frame's first quota (the rows
    the trimmed placeholders would get if the frames were not selected within)."""
    fmt, results = served["fmt"], served["results"]
    context = context_ids(fmt)
    textscythe = kept_positions(BY_ID["image-textscythe-20"], results["image-textscythe-20"])["image"]
    cls = kept_positions(BY_ID["image-cls_attention-20"], results["image-cls_attention-20"])["image"]
    assert textscythe != cls
    ids = results["image-textscythe-20"]["prompt_token_ids"]
    _, wrong = reference(hf_model, ids, visual["image"][0][cls], context)
    gap = logprob_gap(results["image-textscythe-20"], wrong)
    print(f"{fmt} image-textscythe-20 fed cls_attention's rows: max |logprob difference| {gap:.2e}")
    assert gap > 10 * LOGPROB_ATOL

    for case_id in ("video-textscythe-6", "video-cls_attention-53"):
        kept = kept_positions(BY_ID[case_id], results[case_id])["video"]
        quotas = spread_budget(len(kept), [FRAME_TOKENS] * FRAMES)
        first = [f * FRAME_TOKENS + i for f, quota in enumerate(quotas) for i in range(quota)]
        assert kept != first
        _, wrong = reference(hf_model, results[case_id]["prompt_token_ids"], visual["video"][0][first], context)
        gap = logprob_gap(results[case_id], wrong)
        print(f"{fmt} {case_id} fed each frame's first rows: max |logprob difference| {gap:.2e}")
        assert gap > 10 * LOGPROB_ATOL, case_id
