"""Qwen2.5-VL pruning in vLLM against an independent transformers reference: images, videos, both, chunked prefill.

One tiny Qwen2.5-VL checkpoint with random, seeded float32 weights (``textscythe_dev.tiny_qwen``) runs
(one engine at a time, both cores; ~4 minutes in all on a 2-core machine):

* vLLM offline with the plugin (``textscythe_dev.offline`` in a subprocess) with chunked prefill on and
  ``max_num_batched_tokens=64``, so images and videos are split across prefill steps: one batched
  ``LLM.generate`` with every case (mixed budgets, interleaved chunks), then every case alone;
* stock vLLM (``VLLM_PLUGINS=``, same runner and options) on the cases without a budget;
* transformers, here: the vision features and the attention the selectors read, computed by the HF model
  (eager attention weights of the last full-attention block, captured from HF's own attention function); the
  instruction ids (rule written in ``textscythe_dev.reference``); the selection (``get_selector(...).select``);
  and greedy decoding from ``inputs_embeds`` of the pruned prompt with explicit 3-D ``position_ids``: every kept
  row at its ORIGINAL ``(t, h, w)`` position, every text token at its position in the unpruned prompt
  (:func:`original_positions`, the Qwen2.5-VL rule as stock vLLM implements it).

Compared: greedy tokens (identical) and log-probabilities (close) of vLLM vs the reference; the pruned prompt
ids; the positions the engine kept for every pruned item (``$TEXTSCYTHE_SELECTION_LOG``) vs the reference's;
no budget == stock vLLM token for token; batch == solo. Controls: the reference with the kept rows at wrong
positions (all at the item's first position; or at the first K grid cells) and the reference with another
selection both differ from vLLM's log-probabilities by far more than the tolerance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from textscythe_dev.images import scene
from textscythe_dev.offline import Case, OfflineRun, assert_same_generation, runner_request
from textscythe_dev.reference import (
    attention_weights_of,
    chatml_instructions,
    eager_checkpoint,
    greedy_decode,
    largest_difference,
)
from textscythe_vllm.selectors import get_selector

pytestmark = pytest.mark.server

MAX_TOKENS = 8
RUN_TIMEOUT_S = 480
CHUNK_TOKENS = 64  # max_num_batched_tokens: every image/video below spans two or more prefill steps
# float32 on both sides; measured differences are ~1e-6 (see test_reported_differences).
LOGPROB_ATOL = 2e-5
ATTENTION_ATOL = 1e-7  # values ~2e-3..2e-2 (1/(4 N_sequence) on average)
FEATURE_ATOL = 1e-5

IMAGE_WIDE = {"kind": "image", "seed": 1, "width": 336, "height": 224}  # grid 16 x 24 -> 8 x 12 = 96 tokens
IMAGE_TALL = {"kind": "image", "seed": 3, "width": 224, "height": 336}  # 12 x 8 = 96 tokens
VIDEO = {"kind": "video", "seed": 2, "frames": 8, "width": 168, "height": 112}  # 4 steps x 4 x 6 = 96 tokens
TOKENS = 96

USER, END, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"
IMG, VID = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
# prompt name -> (text, media in prompt order)
PROMPTS: dict[str, tuple[str, tuple[dict[str, Any], ...]]] = {
    "img": (f"{USER}{IMG}what colour is the umbrella next to the red car ?{END}{ASSISTANT}", (IMAGE_WIDE,)),
    "vid": (f"{USER}{VID}what is the dog doing on the grass ?{END}{ASSISTANT}", (VIDEO,)),
    "img-vid": (f"{USER}{IMG}{VID}is the car in the picture also in the video ?{END}{ASSISTANT}", (IMAGE_WIDE, VIDEO)),
    # video first, then image (the order of vLLM issue #27859), in two turns
    "vid-img": (
        f"{USER}{VID}what is the dog doing ?{END}{ASSISTANT}it is running{END}"
        f"{USER}{IMG}and what colour is the car ?{END}{ASSISTANT}",
        (VIDEO, IMAGE_TALL),
    ),
}


UNPRUNED_CASES = [Case(f"{name}-full", name) for name in PROMPTS]
PRUNED_CASES = [
    *(Case(f"{name}-textscythe-{k}", name, k) for name in PROMPTS for k in (1, 10, 40)),
    Case("img-cls_attention-20", "img", 20, "cls_attention"),
    Case("vid-cls_attention-20", "vid", 20, "cls_attention"),
    Case("img-vid-visionzip-24", "img-vid", 24, "visionzip"),
    Case("img-vid-divprune-16", "img-vid", 16, "divprune"),
    Case("img-textscythe-96", "img", TOKENS),  # budget == N and > N: nothing is pruned
    Case("vid-textscythe-500", "vid", 500),
]
CASES = UNPRUNED_CASES + PRUNED_CASES
BY_ID = {case.id: case for case in CASES}


# ----------------------------------------------------------------------------------------------------------
# transformers reference
# ----------------------------------------------------------------------------------------------------------


def grid_offsets(t: int, h: int, w: int, t_factor: float) -> torch.Tensor:
    """``[3, t*h*w]`` (t, h, w) offsets of an item's merged grid, raster order; time scaled and truncated."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(tt.double() * t_factor).long(), hh, ww]).reshape(3, -1)


def original_positions(ids: list[int], media: list[Media], media_ids: set[int]) -> tuple[torch.Tensor, int]:
    """Qwen2.5-VL's 3-D positions of an UNPRUNED expanded prompt and the position after it.

    Text advances all three axes by one; an item's cells sit at ``base + (t * t_factor, h, w)``, ``base`` being
    the position after the text before it, and the text after it resumes at ``base + max(offsets) + 1`` (the
    rule of the original Qwen2.5-VL code and of stock vLLM; transformers 5.19's ``get_rope_index`` resumes at
    ``base + max(h, w)`` instead, the same for images, not for videos whose time axis is longest).
    """
    columns, position, index, item = [], 0, 0, 0
    while index < len(ids):
        if ids[index] in media_ids:
            offsets = grid_offsets(*media[item].grid, media[item].t_factor)
            columns.append(offsets + position)
            position += int(offsets.max()) + 1
            index += offsets.shape[1]
            item += 1
        else:
            columns.append(torch.full((3, 1), position))
            position += 1
            index += 1
    return torch.cat(columns, dim=1), position


@dataclass
class Media:
    features: torch.Tensor  # [N, D] merged rows, raster order
    attention: torch.Tensor  # [N] mean attention received at the last full-attention block
    grid: tuple[int, int, int]  # merged (t, h, w)
    t_factor: float


@dataclass
class Reference:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    first_logits: torch.Tensor
    kept: list[torch.Tensor]  # per item
    instructions: list[list[int]]


class HFReference:
    def __init__(self, model_dir: Path) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.processor, self.model = eager_checkpoint(Qwen2_5_VLForConditionalGeneration, model_dir)
        self.tokenizer = self.processor.tokenizer
        config = self.model.config
        self.image_id, self.video_id = config.image_token_id, config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self._media: dict[str, Media] = {}

    # -- vision ----------------------------------------------------------------------------------------

    def pixel_inputs(self, spec: dict[str, Any], **options: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(pixel values, grid_thw [1, 3], t_factor) from the checkpoint's own HF processors."""
        if spec["kind"] == "image":
            out = self.processor.image_processor(
                images=[scene(spec["seed"], spec["width"], spec["height"])], return_tensors="pt", **options
            )
            return out["pixel_values"], out["image_grid_thw"], 1.0
        from transformers.video_utils import VideoMetadata

        from textscythe_dev.tiny_qwen import tiny_video

        frames, metadata = tiny_video(spec["seed"], spec["frames"], spec["width"], spec["height"])
        video_metadata = VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})
        text = f"{USER}{VID}x{END}"
        out = self.processor(text=[text], videos=[frames], video_metadata=[video_metadata],
                             do_sample_frames=False, return_tensors="pt", **options)
        t_factor = float(out["second_per_grid_ts"][0]) * self.model.config.vision_config.tokens_per_second
        return out["pixel_values_videos"], out["video_grid_thw"], t_factor

    @torch.no_grad()
    def media(self, spec: dict[str, Any]) -> Media:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._media:
            from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
            from transformers.vision_utils import get_vision_window_index

            pixel_values, grid_thw, t_factor = self.pixel_inputs(spec)
            visual = self.model.model.visual
            target = visual.blocks[max(visual.fullatt_block_indexes)].attn
            # one [1, heads, L, L] per full-attention sequence (the image, or a video time step)
            with attention_weights_of(modeling_qwen2_5_vl, target) as weights:
                features = visual(pixel_values, grid_thw=grid_thw).pooler_output
            t, h, w = grid_thw[0].tolist()
            assert len(weights) == t and all(x.shape[-1] == h * w for x in weights)
            # mean over heads and queries of what each key patch receives, in the tower's window order
            patches = torch.cat([x[0].mean(dim=0).mean(dim=0) for x in weights])
            merged = patches.reshape(-1, self.merge**2).mean(dim=1)
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=visual.window_size, patch_size=visual.patch_size
            )
            attention = torch.empty_like(merged)
            attention[window_index] = merged  # window order -> raster order
            self._media[key] = Media(features, attention, (t, h // self.merge, w // self.merge), t_factor)
        return self._media[key]

    # -- text --------------------------------------------------------------------------------------------

    def instructions(self, ids: list[int]) -> list[list[int]]:
        """Per item: the ids of its user message (ChatML delimiters) minus special/pad ids."""
        return chatml_instructions(self.tokenizer, ids, (self.image_id, self.video_id))

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))

    @torch.no_grad()
    def select(self, media: Media, instruction: list[int], budget: int | None, selector: str):
        if budget is None or budget >= media.features.shape[0]:
            return torch.arange(media.features.shape[0]), media.features
        result = get_selector(selector).select(media.features, self.embed(instruction), media.attention, budget)
        return result.indices, result.embeddings

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=embeds[None], position_ids=positions[:, None, :], use_cache=False)
        return out.logits[0, -1].float()

    @torch.no_grad()
    def reference(self, case: Case, selector: str | None = None, layout: str = "original") -> Reference:
        """Greedy decoding of the pruned prompt. ``layout`` places the kept rows: "original" (their own cells),
        or, as controls, "base" (all at the item's first cell) or "first" (at the item's first K cells)."""
        text, specs = PROMPTS[case.prompt]
        ids = self.tokenizer(text).input_ids
        instructions = self.instructions(ids)
        media = [self.media(spec) for spec in specs]
        assert len(instructions) == len(media)
        # the unpruned expanded prompt and its positions
        full_ids, item = [], 0
        for token in ids:
            if token in (self.image_id, self.video_id):
                full_ids += [token] * media[item].features.shape[0]
                item += 1
            else:
                full_ids.append(token)
        positions, end = original_positions(full_ids, media, {self.image_id, self.video_id})
        table = self.model.get_input_embeddings()
        pieces, kept_positions, pruned_ids, kept_all = [], [], [], []
        index = item = 0
        while index < len(full_ids):
            token = full_ids[index]
            if token not in (self.image_id, self.video_id):
                pieces.append(table(torch.tensor([token])))
                kept_positions.append(positions[:, index:index + 1])
                pruned_ids.append(token)
                index += 1
                continue
            count = media[item].features.shape[0]
            kept, rows = self.select(media[item], instructions[item], case.budget, selector or case.selector)
            cells = positions[:, index:index + count]
            chosen = {
                "original": cells[:, kept], "base": cells[:, :1].expand(3, len(kept)), "first": cells[:, :len(kept)],
            }[layout]
            pieces.append(rows)
            kept_positions.append(chosen)
            pruned_ids += [token] * len(kept)
            kept_all.append(kept)
            index += count
            item += 1
        embeds, pos = torch.cat(pieces), torch.cat(kept_positions, dim=1)

        def next_logits(generated: list[int]) -> torch.Tensor:  # generated tokens continue after the unpruned end
            after = torch.arange(end, end + len(generated)).expand(3, -1)
            return self.logits(torch.cat([embeds, table(torch.tensor(generated, dtype=torch.long))]),
                               torch.cat([pos, after], dim=1))

        tokens, logprobs, first_logits = greedy_decode(next_logits, MAX_TOKENS)
        return Reference(pruned_ids, tokens, logprobs, first_logits, kept_all, instructions)


# ----------------------------------------------------------------------------------------------------------
# vLLM runs (subprocesses)
# ----------------------------------------------------------------------------------------------------------


def request_spec(case: Case) -> dict[str, Any]:
    text, specs = PROMPTS[case.prompt]
    return runner_request(case, text, specs, MAX_TOKENS)


def start_qwen_runner(model_dir: Path, workdir: Path, name: str, cases: list[Case], env: dict[str, str],
                      probe: list[dict[str, Any]] | None = None, log_selections: bool = False) -> OfflineRun:
    probe_path = None
    if probe:
        probe_path = str(workdir / f"{name}-probe.pt")
        torch.save(probe, probe_path)
    return OfflineRun(
        model_dir, workdir, name, [request_spec(case) for case in cases], env, log_selections=log_selections,
        probe_items=probe_path, llm_kwargs={"max_num_batched_tokens": CHUNK_TOKENS, "enable_chunked_prefill": True,
                                            "limit_mm_per_prompt": {"image": 2, "video": 2}},
    )


@pytest.fixture(scope="module")
def tiny_qwen_weights_dir(tmp_path_factory) -> Path:
    from textscythe_dev.tiny_qwen import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl-weights"), with_weights=True)


@pytest.fixture(scope="module")
def hf(tiny_qwen_weights_dir: Path) -> HFReference:
    return HFReference(tiny_qwen_weights_dir)


PROBED = (IMAGE_WIDE, IMAGE_TALL, VIDEO)


@pytest.fixture(scope="module")
def plugin_process(tiny_qwen_weights_dir: Path, hf: HFReference, tmp_path_factory):
    """The plugin engine on every case (started first: the reference is computed while it runs), plus a probe of
    the plugin model's own attention and features for :data:`PROBED`."""
    workdir = tmp_path_factory.mktemp("qwen-equivalence")
    probe = []
    for spec in PROBED:
        pixel_values, grid_thw, _ = hf.pixel_inputs(spec)
        raw, _, _ = hf.pixel_inputs(spec, do_rescale=False, do_normalize=False)
        probe.append({"pixel_values": pixel_values, "raw_pixel_values": raw, "grid_thw": grid_thw})
    run = start_qwen_runner(tiny_qwen_weights_dir, workdir, "plugin", CASES,
                            {"VLLM_PLUGINS": "textscythe", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, probe,
                            log_selections=True)
    yield run, workdir
    run.stop()


@pytest.fixture(scope="module")
def references(hf: HFReference, plugin_process) -> dict[str, Reference]:
    return {case.id: hf.reference(case) for case in CASES}  # computed while the engine runs


@pytest.fixture(scope="module")
def vllm_runs(plugin_process, tiny_qwen_weights_dir: Path) -> dict[str, dict[str, Any]]:
    """{"plugin": ..., "stock": ...}. One engine at a time (the machine is shared): stock vLLM (on the unpruned
    cases) starts when the plugin run is done."""
    plugin, workdir = plugin_process
    runs = {"plugin": plugin.results(time.monotonic() + RUN_TIMEOUT_S)}
    stock = start_qwen_runner(tiny_qwen_weights_dir, workdir, "stock", UNPRUNED_CASES, {"VLLM_PLUGINS": ""})
    try:
        runs["stock"] = stock.results(time.monotonic() + RUN_TIMEOUT_S)
    finally:
        stock.stop()
    print("engine timings:", {name: run["timings"] for name, run in runs.items()})
    return runs


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------


def test_reference_rules_match_the_checkpoint(hf: HFReference):
    rendered = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == f"{USER}{IMG}hi{END}{ASSISTANT}"
    ids = hf.tokenizer(PROMPTS["vid-img"][0]).input_ids
    first, second = hf.instructions(ids)
    words = hf.tokenizer.convert_ids_to_tokens
    assert words(first) == ["what", "is", "the", "dog", "doing", "?"]
    assert words(second) == ["and", "what", "colour", "is", "the", "car", "?"]
    # the reference's positions agree with transformers' own get_rope_index wherever the two rules agree (images)
    text, specs = PROMPTS["img"]
    inputs = hf.processor(text=[text], images=[scene(1, 336, 224)], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    ours, _ = original_positions(ids, [hf.media(spec) for spec in specs], {hf.image_id, hf.video_id})
    theirs, _ = hf.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(ours, theirs[:, 0])


def test_reference_matches_hf_own_forward(hf: HFReference, references):
    """The hand-built inputs_embeds + position_ids reproduce HF's own forward on the processor's output."""
    text, (spec,) = PROMPTS["img"]
    inputs = hf.processor(text=[text], images=[scene(spec["seed"], spec["width"], spec["height"])], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == references["img-full"].prompt_token_ids
    with torch.no_grad():
        logits = hf.model(**inputs).logits[0, -1].float()
    torch.testing.assert_close(logits, references["img-full"].first_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_id", [case.id for case in UNPRUNED_CASES])
def test_no_budget_is_stock_vllm(vllm_runs, case_id):
    for mode in ("solo", "batch"):
        assert_same_generation(vllm_runs["plugin"][mode][case_id], vllm_runs["stock"][mode][case_id], mode)
    assert vllm_runs["plugin"]["solo"][case_id]["logprobs"] == vllm_runs["stock"]["solo"][case_id]["logprobs"]


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_vllm_matches_hf_reference(vllm_runs, references, case_id):
    reference, got, case = references[case_id], vllm_runs["plugin"]["solo"][case_id], BY_ID[case_id]
    kept = min(case.budget or TOKENS, TOKENS)
    assert [len(k) for k in reference.kept] == [kept] * len(PROMPTS[case.prompt][1])
    assert got["prompt_token_ids"] == reference.prompt_token_ids
    assert got["token_ids"] == reference.token_ids
    assert largest_difference(got["logprobs"], reference.logprobs) <= LOGPROB_ATOL


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_batch_with_mixed_budgets_equals_solo(vllm_runs, case_id):
    assert_same_generation(vllm_runs["plugin"]["batch"][case_id], vllm_runs["plugin"]["solo"][case_id])


def test_prompt_tokens_drop_by_exactly_the_pruned_count(vllm_runs):
    solo = vllm_runs["plugin"]["solo"]
    for case in PRUNED_CASES:
        full = len(solo[f"{case.prompt}-full"]["prompt_token_ids"])
        items = len(PROMPTS[case.prompt][1])
        assert len(solo[case.id]["prompt_token_ids"]) == full - items * (TOKENS - min(case.budget, TOKENS)), case.id


def test_engine_kept_positions_match_hf(vllm_runs, references):
    expected = set()
    for case in PRUNED_CASES:
        if case.budget < TOKENS:
            reference = references[case.id]
            expected |= {
                (case.selector, case.budget, len(instruction), tuple(int(i) for i in kept))
                for instruction, kept in zip(reference.instructions, reference.kept, strict=True)
            }
    logged = {
        (r["selector"], r["budget"], r["instruction_tokens"], tuple(r["kept_positions"]))
        for r in vllm_runs["plugin"]["selections"]
    }
    assert all(r["num_tokens"] == TOKENS for r in vllm_runs["plugin"]["selections"])
    assert logged == expected


def test_positions_and_selection_are_what_the_comparison_sees(hf: HFReference, references, vllm_runs):
    """Guards against a vacuous pass: wrong positions or another selection change vLLM's log-probabilities by
    far more than the tolerance, for images, videos and both."""
    for case_id in ("img-textscythe-40", "vid-textscythe-40", "img-vid-textscythe-10", "vid-img-textscythe-40"):
        got = vllm_runs["plugin"]["solo"][case_id]["logprobs"]
        for layout in ("base", "first"):
            wrong = hf.reference(BY_ID[case_id], layout=layout).logprobs
            assert largest_difference(got, wrong) > 20 * LOGPROB_ATOL, (case_id, layout)
        other = hf.reference(BY_ID[case_id], selector="uniform").logprobs
        assert largest_difference(got, other) > 20 * LOGPROB_ATOL, case_id
    assert not torch.equal(references["img-textscythe-40"].kept[0], torch.arange(40))


def test_no_position_errors_logged(vllm_runs):
    assert "cannot place" not in vllm_runs["plugin"]["log"]
    assert "keep their item's base position" not in vllm_runs["plugin"]["log"]
    assert "selector" not in vllm_runs["plugin"]["log"] or "falling back" not in vllm_runs["plugin"]["log"]


def test_plugin_attention_and_features_match_hf(hf: HFReference, vllm_runs):
    """The probe's attention (hook on vLLM's rotary module, chunked column means, window order undone) equals the
    mean of HF's eager attention weights at the last full-attention block; the tower's rows equal HF's."""
    probes = vllm_runs["plugin"]["probe"]
    assert len(probes) == len(PROBED)
    for spec, got in zip(PROBED, probes, strict=True):
        media = hf.media(spec)
        attention = torch.tensor(got["attention"], dtype=torch.float32)
        assert attention.shape == media.attention.shape
        torch.testing.assert_close(attention, media.attention, atol=ATTENTION_ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(got["features"]), media.features, atol=FEATURE_ATOL, rtol=0)
        # per full-attention sequence (image, or video time step) the received attention sums to 1 / merge**2
        t = media.grid[0]
        torch.testing.assert_close(attention.reshape(t, -1).sum(dim=1), torch.full((t,), 1 / hf.merge**2),
                                   atol=1e-5, rtol=0)



def test_chunked_prefill_splits_pruned_images_and_videos(vllm_runs):
    """Coverage guard: in the solo runs, prefill steps of CHUNK_TOKENS cut through a pruned image and a pruned
    video (so kept rows of one item arrive in two steps), and through unpruned ones."""
    from textscythe_dev.tiny_qwen import IMAGE_PAD, VIDEO_PAD, vocabulary

    pads = {vocabulary()[IMAGE_PAD]: "image", vocabulary()[VIDEO_PAD]: "video"}
    split = set()
    for case in CASES:
        ids = vllm_runs["plugin"]["solo"][case.id]["prompt_token_ids"]
        start = 0
        while start < len(ids):
            token = ids[start]
            end = start
            while end < len(ids) and ids[end] == token:
                end += 1
            if token in pads and start // CHUNK_TOKENS != (end - 1) // CHUNK_TOKENS:
                split.add((pads[token], case.budget is not None and case.budget < TOKENS))
            start = end
    assert split == {("image", True), ("video", True), ("image", False), ("video", False)}
