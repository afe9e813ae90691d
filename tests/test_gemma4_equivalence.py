"""Gemma 4 pruning in vLLM against an independent transformers reference fed the rows vLLM kept.

One tiny Gemma 4 checkpoint with random, seeded float32 weights (``textscythe_dev.tiny_gemma4``; causal attention
over image tokens, as in the small Gemma 4 models) is served by ``vllm serve`` with the plugin,
``$TEXTSCYTHE_SELECTION_LOG`` set, chunked prefill with ``--max-num-batched-tokens`` :data:`CHUNK_TOKENS` (every
case's image or video is split across prefill steps) and no prefix caching; every pruned item's kept positions are
read from that log, and every engine step from its log (``--enable-logging-iteration-details``). Every case is
sent alone, then all of them at once. The reference is transformers' ``Gemma4ForConditionalGeneration`` (eager
attention), here:

* the soft-token rows of each image, and of each video frame (processed, as vLLM does, by the image processor at
  70 soft tokens, frames decoded from the same mp4 with OpenCV), from transformers' own vision tower and embedder;
* the pruned prompt, written here: the chat template's text with each ``<|image|>`` expanded to ``<|image>`` +
  K x ``<|image|>`` + ``<image|>`` and each ``<|video|>`` to its frames' ``mm:ss`` timestamps and markers around
  each frame's :func:`~textscythe_vllm.processing.spread_budget` quota -- compared with the prompt ids the server
  reports (``return_token_ids``);
* greedy decoding from that prompt with the kept rows (``features[kept_positions]``) scattered into the
  placeholders (``mm_encoder_outputs``) at 1-D positions ``0..L-1``: kept rows take consecutive positions, as vLLM
  gives them.

Compared: greedy tokens (identical) and log-probabilities (within :data:`LOGPROB_ATOL`) for budgets 10 and 40 with
two selectors on an image, two selectors on a video, an image and a video together, and no budget. Control: the
reference fed another choice of rows (the first K) differs from vLLM by far more than the tolerance. Chunking is
observed: each case alone was prefilled in steps of :data:`CHUNK_TOKENS` tokens, with a step boundary between two of
its soft tokens. Batched: all cases sent concurrently (mixed budgets and selectors, sharing engine steps, each item
under a fresh ``uuid`` so its rows are encoded and selected again rather than read from the encoder cache) give the
same prompt ids, greedy tokens and kept positions as sent alone.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from textscythe_dev import tiny_gemma4
from textscythe_dev.images import data_url, decoded_frames, scene
from textscythe_dev.offline import read_selection_log
from textscythe_dev.reference import largest_difference
from textscythe_dev.server import Served
from textscythe_dev.server import chat as server_chat
from textscythe_vllm.processing import spread_budget

pytestmark = pytest.mark.server

MAX_TOKENS = 8
LOGPROB_ATOL = 1e-4
QUESTION = "what is the dog doing next to the red car ?"
IMAGE = (480, 336)  # 70 soft tokens
NUM_FRAMES, FPS = 4, 1.0
VIDEO_SIZE = (336, 240)  # 63 soft tokens per frame
VIDEO_FRAME_TOKENS = 70  # vLLM's soft-token budget per video frame
# The smallest pruned prompt (image, budget 10: soft tokens at 4..13) still has a boundary inside its run, and vLLM
# caps max_num_seqs at this value, which stays above len(CASES) so the whole batch can run at once. The tiny model's
# image attention is causal, so vLLM splits an item across steps (with bidirectional vision attention it would keep
# each item whole: disable_chunked_mm_input).
CHUNK_TOKENS = 12


@dataclass(frozen=True)
class Case:
    id: str
    image: int | None  # scene seed
    video: int | None  # clip seed
    budget: int | None
    selector: str = "textscythe"


CASES = [
    Case("image-full", 11, None, None),
    *(Case(f"image-{selector}-{budget}", 11, None, budget, selector)
      for selector in ("textscythe", "cls_attention") for budget in (10, 40)),
    Case("video-full", None, 2, None),
    Case("video-textscythe-20", None, 2, 20),
    Case("video-cls_attention-40", None, 2, 40, "cls_attention"),
    Case("both-divprune-30", 12, 3, 30, "divprune"),
]


def clip_bytes(seed: int) -> bytes:
    from textscythe_dev.images import video_data_url

    url = video_data_url(seed, num_frames=NUM_FRAMES, width=VIDEO_SIZE[0], height=VIDEO_SIZE[1], fps=FPS)
    return base64.b64decode(url.split(",", 1)[1])


def message(case: Case, uuid: str | None = None) -> dict[str, Any]:
    """The case's user message; ``uuid``, when given, names its items (vLLM's cache key instead of their bytes)."""
    content: list[dict[str, Any]] = []
    if case.image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(scene(case.image, *IMAGE))}})
    if case.video is not None:
        url = "data:video/mp4;base64," + base64.b64encode(clip_bytes(case.video)).decode()
        content.append({"type": "video_url", "video_url": {"url": url}})
    if uuid is not None:
        for part in content:
            part["uuid"] = f"{uuid}-{part['type']}"
    return {"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_gemma4.build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-weights"), with_weights=True)


# No prefix caching: the batch must recompute every prompt, not reuse the KV blocks the solo requests left behind.
# The per-step log is the only record of prefill chunks: vLLM's iteration-token metrics count a prompt once, when its
# first token comes out.
SERVED = Served("model_dir", ("--dtype", "float32", "--seed", "0", "--limit-mm-per-prompt", '{"image": 1, "video": 1}',
                              "--enable-chunked-prefill", "--max-num-batched-tokens", str(CHUNK_TOKENS),
                              "--no-enable-prefix-caching", "--enable-logging-iteration-details"),
                name="tiny-gemma4-equivalence", env_fixture="selection_env", timeout=600)
ITERATION = re.compile(r"Iteration\(\d+\): (\d+) context requests, (\d+) context tokens, (\d+) generation requests, "
                       r"(\d+) generation tokens")


@dataclass
class ServedCase:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    kept: dict[str, list[int]]  # per pruned modality: kept positions
    prefill: list[int] = field(default_factory=list)  # sent alone: the tokens of each step that prefilled it


def ask(client, server, case: Case, uuid: str | None = None) -> ServedCase:
    """One greedy completion of the case; ``kept`` is left empty."""
    extra = {"visual_token_selector": case.selector} if case.budget else {}
    response = server_chat(client, server.model_name, [message(case, uuid)], case.budget, MAX_TOKENS, logprobs=True,
                           return_token_ids=True, return_tokens_as_token_ids=True, **extra)
    content = response.choices[0].logprobs.content  # tokens as "token_id:<id>"
    return ServedCase(response.model_extra["prompt_token_ids"], [int(t.token.split(":")[1]) for t in content],
                      [t.logprob for t in content], {})


def engine_steps(server, start: int = 0) -> list[tuple[int, ...]]:
    """``(context requests, context tokens, generation requests, generation tokens)`` of every engine step the
    server logged after byte ``start`` of its log."""
    text = server.log_path.read_bytes()[start:].decode(errors="replace")
    return [tuple(int(value) for value in match.groups()) for match in ITERATION.finditer(text)]


@pytest.fixture(scope="module")
def served(client, server, selection_log) -> dict[str, ServedCase]:
    """Every case once, alone, through the server; each pruned item's kept positions from the selection log."""
    results = {}
    for case in CASES:
        start, offset = len(read_selection_log(selection_log)), server.log_path.stat().st_size
        result = ask(client, server, case)
        # a step that prefills is logged before the ones that decode, so all of them are in the log by now
        result.prefill = [tokens for requests, tokens, _, _ in engine_steps(server, offset) if requests]
        records = read_selection_log(selection_log)[start:]
        # the model embeds images before videos (the order of its parsed inputs); one record per pruned item
        modalities = [m for m, seed in (("image", case.image), ("video", case.video)) if seed is not None]
        kept = {}
        for record in records:
            modality = next(m for m in modalities if m not in kept and record["num_tokens"] == (
                70 if m == "image" else NUM_FRAMES * 63))
            kept[modality] = record["kept_positions"]
        result.kept = kept
        results[case.id] = result
    return results


@dataclass
class Batched:
    results: dict[str, ServedCase]
    records: list[dict[str, Any]]  # the selection log's records written while the batch ran
    steps: list[tuple[int, ...]]  # the engine steps logged while it ran (see engine_steps)


@pytest.fixture(scope="module")
def batched(client, server, selection_log, served) -> Batched:
    """Every case at once (one thread each), after the solo run."""
    start, offset = len(read_selection_log(selection_log)), server.log_path.stat().st_size
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {case.id: pool.submit(ask, client, server, case, f"batch-{case.id}") for case in CASES}
        results = {case_id: future.result() for case_id, future in futures.items()}
    return Batched(results, read_selection_log(selection_log)[start:], engine_steps(server, offset))


class HFReference:
    def __init__(self, model_dir) -> None:
        from transformers import AutoProcessor, Gemma4ForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.model = Gemma4ForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        self.config = self.model.config

    @torch.no_grad()
    def rows(self, images: list[Any], max_soft_tokens: int | None = None) -> list[torch.Tensor]:
        """Per image: its ``[N, D]`` soft-token rows from transformers' tower and embedder."""
        options = {} if max_soft_tokens is None else {"max_soft_tokens": max_soft_tokens}
        out = self.processor.image_processor(images=images, return_tensors="pt", **options)
        features = self.model.model.get_image_features(out["pixel_values"], out["image_position_ids"])
        return list(features.pooler_output)

    def frames(self, seed: int) -> list[Any]:
        from PIL import Image

        frames = decoded_frames(clip_bytes(seed))
        assert len(frames) == NUM_FRAMES
        return [Image.fromarray(frame) for frame in frames]  # vLLM hands Gemma 4 PIL frames

    def prompt(self, case: Case, kept: dict[str, list[int]], counts: dict[str, list[int]]) -> list[int]:
        """The pruned prompt: the template's ids with each item expanded to its kept soft tokens (a video: per frame,
        its timestamp, markers and quota)."""
        vocab = self.tokenizer.get_vocab()
        boi, eoi = vocab[tiny_gemma4.BOI_TOKEN], vocab[tiny_gemma4.EOI_TOKEN]
        image_id, video_id = vocab[tiny_gemma4.IMAGE_TOKEN], vocab[tiny_gemma4.VIDEO_TOKEN]
        text = self.tokenizer.apply_chat_template([message(case)], tokenize=False, add_generation_prompt=True)
        ids = []
        for token in self.tokenizer.encode(text, add_special_tokens=False):
            if token == image_id:
                ids += [boi, *[image_id] * len(kept["image"]), eoi]
            elif token == video_id:
                quotas = spread_budget(len(kept["video"]), counts["video"])
                for frame, quota in enumerate(quotas):
                    stamp = f"{int(frame / FPS) // 60:02d}:{int(frame / FPS) % 60:02d}"
                    ids += self.tokenizer.encode(f" {stamp} " if frame else f"{stamp} ", add_special_tokens=False)
                    ids += [boi, *[video_id] * quota, eoi]
            else:
                ids.append(token)
        return ids

    @torch.no_grad()
    def generate(self, ids: list[int], rows: dict[str, torch.Tensor]) -> tuple[list[int], list[float]]:
        """Greedy decoding (no KV cache: the whole sequence each step) with ``rows`` in the placeholders."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        encoded = {modality: BaseModelOutputWithPooling(pooler_output=[value]) for modality, value in rows.items()}
        tokens, logprobs = [], []
        for _ in range(MAX_TOKENS):
            logits = self.model(input_ids=torch.tensor([ids + tokens]), mm_encoder_outputs=dict(encoded),
                                use_cache=False).logits[0, -1].float()
            token = int(torch.argmax(logits))
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        return tokens, logprobs

    def item_rows(self, case: Case) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Per modality: all soft-token rows of the case's item (a video: its frames' rows in order) and the
        per-frame counts."""
        rows, counts = {}, {}
        if case.image is not None:
            (rows["image"],) = self.rows([scene(case.image, *IMAGE)])
            counts["image"] = [rows["image"].shape[0]]
        if case.video is not None:
            frames = self.rows(self.frames(case.video), VIDEO_FRAME_TOKENS)
            rows["video"], counts["video"] = torch.cat(frames), [frame.shape[0] for frame in frames]
        return rows, counts


@pytest.fixture(scope="module")
def hf(model_dir):
    return HFReference(model_dir)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_vllm_equals_transformers_fed_the_kept_rows(case, served, hf):
    ours = served[case.id]
    rows, counts = hf.item_rows(case)
    assert counts.get("image", [70]) == [70] and counts.get("video", [63] * NUM_FRAMES) == [63] * NUM_FRAMES
    kept = {modality: ours.kept.get(modality, list(range(value.shape[0]))) for modality, value in rows.items()}
    assert set(ours.kept) == ({m for m in rows if case.budget and case.budget < rows[m].shape[0]})
    for modality, positions in kept.items():
        assert len(positions) == min(case.budget or 10**9, rows[modality].shape[0])
    ids = hf.prompt(case, kept, counts)
    assert ids == ours.prompt_token_ids
    tokens, logprobs = hf.generate(ids, {m: rows[m][kept[m]] for m in rows})
    assert tokens == ours.token_ids
    difference = largest_difference(logprobs, ours.logprobs)
    print(f"{case.id}: prompt tokens {len(ids)}, max |logprob difference| {difference:.2e}")
    assert difference <= LOGPROB_ATOL


def test_another_choice_of_rows_is_far_from_vllm(served, hf):
    """Control: the comparison sees which rows were kept -- the first K rows in the same placeholders move the
    log-probabilities far beyond the tolerance (or change a greedy token)."""
    case = next(case for case in CASES if case.id == "image-textscythe-10")
    ours = served[case.id]
    rows, _ = hf.item_rows(case)
    assert ours.kept["image"] != list(range(10))
    tokens, logprobs = hf.generate(ours.prompt_token_ids, {"image": rows["image"][:10]})
    if tokens == ours.token_ids:
        assert largest_difference(logprobs, ours.logprobs) > 10 * LOGPROB_ATOL


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_prefill_was_chunked(case, served, hf):
    """Sent alone, the case was prefilled CHUNK_TOKENS tokens at a time, and a step boundary falls between two of
    its soft tokens: its image or video reached the model over several prefill steps."""
    ids = served[case.id].prompt_token_ids
    full, rest = divmod(len(ids), CHUNK_TOKENS)
    assert served[case.id].prefill == [CHUNK_TOKENS] * full + ([rest] if rest else [])
    vocab = hf.tokenizer.get_vocab()
    soft = {index for index, token in enumerate(ids)
            if token in (vocab[tiny_gemma4.IMAGE_TOKEN], vocab[tiny_gemma4.VIDEO_TOKEN])}
    assert any(index % CHUNK_TOKENS == 0 and index - 1 in soft for index in soft)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_batch_with_mixed_budgets_equals_solo(case, served, batched):
    solo, batch = served[case.id], batched.results[case.id]
    assert batch.prompt_token_ids == solo.prompt_token_ids
    assert batch.token_ids == solo.token_ids
    difference = largest_difference(batch.logprobs, solo.logprobs)
    print(f"{case.id}: batch vs solo max |logprob difference| {difference:.2e}")


def test_batch_kept_the_same_positions_and_ran_together(served, batched):
    """The batch selected again (a record per pruned item) and kept, item for item, the rows the solo requests kept;
    its requests shared engine steps, none of them over CHUNK_TOKENS tokens."""
    solo = Counter((case.selector, case.budget, len(positions), tuple(positions))
                   for case in CASES for positions in served[case.id].kept.values())
    batch = Counter((record["selector"], record["budget"], len(record["kept_positions"]),
                     tuple(record["kept_positions"])) for record in batched.records)
    assert sum(solo.values()) == 8 and batch == solo
    assert max(context + generation for context, _, generation, _ in batched.steps) > 1
    assert max(context_tokens + generation_tokens for _, context_tokens, _, generation_tokens in batched.steps) \
        <= CHUNK_TOKENS
