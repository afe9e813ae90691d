"""Qwen3-VL (dense and MoE) and Qwen3.5 pruning in vLLM against an independent transformers reference: images,
timestamped videos, both, DeepStack, interleaved M-RoPE, chunked prefill.

One tiny Qwen3-VL checkpoint (and one Qwen3-VL-MoE, one Qwen3.5) with random, seeded float32 weights
(``textscythe_dev.tiny_qwen3_vl``) runs in vLLM
offline with the plugin (``textscythe_dev.offline`` in a subprocess) with chunked prefill on and
``max_num_batched_tokens=64`` (images and videos split across prefill steps): one batched ``LLM.generate`` with
every case, then every case alone. The reference, here, with transformers' own Qwen3-VL:

* the expanded prompt (timestamps included) from the checkpoint's HF processor and its 3-D positions from
  transformers' ``get_rope_index``;
* the vision rows (main merger and every DeepStack level) from ``get_image_features``, and the attention the
  selectors read from HF's eager attention weights at the tower's last block (mean over heads and queries of
  each patch's frame, then over each merged row's 4 patches);
* the instruction (the user message's words, rule written in ``textscythe_dev.reference``), the selection
  (``get_selector(...).select``; videos frame by frame with :func:`spread_budget` quotas);
* greedy decoding from ``inputs_embeds`` of the pruned prompt with every kept row at its ORIGINAL position, every
  text token at its unpruned position, and every DeepStack level fed exactly the kept rows.

Compared: prompt ids, greedy tokens (identical), log-probabilities (within 1e-4), kept positions (selection log).
Controls: kept rows at wrong positions, another choice of rows, or DeepStack levels fed from other rows, move the
log-probabilities far more than the tolerance.

Qwen3.5 (no DeepStack; a hybrid Gated-DeltaNet LLM) runs in vLLM in bf16 only on CPU. The engine runs the bf16-cast
weights in bf16 and the reference the same bf16 weights in float32, so rounding decides some near-ties: the
reference is fed the rows the engine kept and scored on the engine's tokens (teacher forcing), every engine token
must be the reference's greedy choice up to :data:`BF16_LOGPROB_ATOL`, log-probabilities agree within it, and the
reference's own selection shares at least :data:`BF16_SHARED_SELECTION` of the engine's kept positions (at least
half of every item's).
"""

from __future__ import annotations

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
    largest_difference,
)
from textscythe_vllm.processing import spread_budget
from textscythe_vllm.selectors import get_selector

pytestmark = pytest.mark.server

MAX_TOKENS = 6
RUN_TIMEOUT_S = 480
CHUNK_TOKENS = 64
LOGPROB_ATOL = 1e-4
BF16_LOGPROB_ATOL = 3e-2
BF16_SHARED_SELECTION = 0.9  # of all kept positions, over every pruned item

IMAGE = {"kind": "image", "seed": 1, "width": 336, "height": 224}  # 10 x 7 = 70 tokens
VIDEO = {"kind": "video", "seed": 2, "frames": 8, "width": 168, "height": 112}  # 4 frames x 5 x 4 = 80 tokens

USER, END, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"
IMG, VID = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
PROMPTS: dict[str, tuple[str, tuple[dict[str, Any], ...]]] = {
    "img": (f"{USER}{IMG}what colour is the umbrella next to the red car ?{END}{ASSISTANT}", (IMAGE,)),
    "vid": (f"{USER}{VID}what is the dog doing on the grass ?{END}{ASSISTANT}", (VIDEO,)),
    "img-vid": (f"{USER}{IMG}{VID}is the car in the picture also in the video ?{END}{ASSISTANT}", (IMAGE, VIDEO)),
}


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    deepstack: bool
    logprob_atol: float
    control_floor: float  # the least a control must move the log-probabilities

    @property
    def exact(self) -> bool:
        """float32 on both sides: the same selection and the same greedy tokens are required."""
        return self.dtype == torch.float32


VARIANTS = {variant.name: variant for variant in (
    Variant("qwen3-vl", torch.float32, True, LOGPROB_ATOL, 20 * LOGPROB_ATOL),
    Variant("qwen3-vl-moe", torch.float32, True, LOGPROB_ATOL, 20 * LOGPROB_ATOL),
    # vLLM's CPU Gated-DeltaNet kernel runs in bf16 only: the engine runs the bf16-cast weights in bf16, the
    # reference the same bf16 weights in float32; the tolerance is what the engine's bf16 rounding allows
    Variant("qwen3.5", torch.bfloat16, False, BF16_LOGPROB_ATOL, 5 * BF16_LOGPROB_ATOL),
)}


CASES = [
    *(Case(f"{name}-full", name) for name in PROMPTS),
    Case("img-textscythe-10", "img", 10), Case("img-textscythe-40", "img", 40),
    Case("img-divprune-16", "img", 16, "divprune"), Case("img-cls_attention-20", "img", 20, "cls_attention"),
    Case("img-visionzip-24", "img", 24, "visionzip"),
    Case("vid-textscythe-3", "vid", 3), Case("vid-textscythe-30", "vid", 30),
    Case("vid-cls_attention-20", "vid", 20, "cls_attention"),
    Case("img-vid-textscythe-12", "img-vid", 12),
]
BY_ID = {case.id: case for case in CASES}


@dataclass
class Media:
    rows: torch.Tensor  # [N, D] main merger rows, raster order (frame by frame)
    deepstack: list[torch.Tensor]  # per level [N, D]
    attention: torch.Tensor  # [N]
    frames: int
    frame_tokens: int


@dataclass
class Reference:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # of token_ids
    top_logprobs: list[float]  # the largest log-probability at each step
    kept: list[torch.Tensor]


class HFReference:
    def __init__(self, model_dir: Path, variant: Variant) -> None:
        from transformers import AutoModelForImageTextToText  # Qwen3-VL, Qwen3-VL-MoE or Qwen3.5

        self.processor, self.model = eager_checkpoint(AutoModelForImageTextToText, model_dir, variant.dtype)
        self.tokenizer = self.processor.tokenizer
        self.deepstack = variant.deepstack
        config = self.model.config
        self.image_id, self.video_id = config.image_token_id, config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self._media: dict[str, Media] = {}

    def processed(self, text: str, specs: tuple[dict[str, Any], ...]) -> Any:
        from transformers.video_utils import VideoMetadata

        from textscythe_dev.tiny_qwen import tiny_video

        images = [scene(s["seed"], s["width"], s["height"]) for s in specs if s["kind"] == "image"]
        videos, metadata = [], []
        for spec in (s for s in specs if s["kind"] == "video"):
            frames, meta = tiny_video(spec["seed"], spec["frames"], spec["width"], spec["height"])
            videos.append(frames)
            metadata.append(VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"}))
        return self.processor(text=[text], images=images or None, videos=videos or None,
                              video_metadata=metadata or None, do_sample_frames=False, return_tensors="pt")

    @torch.no_grad()
    def media(self, spec: dict[str, Any]) -> Media:
        key = repr(sorted(spec.items()))
        if key not in self._media:
            import sys

            modeling = sys.modules[type(self.model).__module__]  # modeling_qwen3_vl or modeling_qwen3_vl_moe

            inputs = self.processed(IMG if spec["kind"] == "image" else VID, (spec,))
            pixels, grid = ((inputs["pixel_values"], inputs["image_grid_thw"]) if spec["kind"] == "image"
                            else (inputs["pixel_values_videos"], inputs["video_grid_thw"]))
            # one [1, heads, L, L] per frame (or for the image)
            with attention_weights_of(modeling, self.model.model.visual.blocks[-1].attn) as weights:
                out = self.model.model.get_image_features(pixels, grid)
            t, h, w = grid[0].tolist()
            assert len(weights) == t and all(x.shape[-1] == h * w for x in weights)
            patches = torch.cat([x[0].mean(dim=0).mean(dim=0) for x in weights])  # merge-block order
            attention = patches.reshape(-1, self.merge**2).mean(dim=1)
            levels = [level[0] for level in out.deepstack_features] if self.deepstack else []
            self._media[key] = Media(out.pooler_output[0], levels, attention, t, h * w // self.merge**2)
        return self._media[key]

    def instructions(self, ids: list[int]) -> list[list[int]]:
        """Per item: the ids of its user message (ChatML delimiters) minus special/pad ids."""
        return chatml_instructions(self.tokenizer, ids, (self.image_id, self.video_id))

    @torch.no_grad()
    def select(self, media: Media, instruction: list[int], budget: int | None, selector: str,
               kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept [K] ascending, rows [K, D])``: per frame with its quota (an image is one frame). ``kept``, when
        given, replaces the selection: the rows at those positions (a merging selector must have kept them)."""
        if kept is not None:
            own, rows = self.select(media, instruction, budget, selector)
            if torch.equal(own, kept):
                return own, rows
            assert torch.equal(rows, media.rows[own]), f"{selector} merges rows and chose differently"
            return kept, media.rows[kept]
        size = media.frame_tokens
        if budget is None or budget >= media.rows.shape[0]:
            return torch.arange(media.rows.shape[0]), media.rows
        text = self.model.get_input_embeddings()(torch.tensor(instruction, dtype=torch.long))
        kept, rows = [], []
        for frame, quota in enumerate(spread_budget(budget, [size] * media.frames)):
            if quota:
                part = slice(frame * size, (frame + 1) * size)
                result = get_selector(selector).select(media.rows[part], text, media.attention[part], quota)
                kept.append(result.indices + frame * size)
                rows.append(result.embeddings)
        return torch.cat(kept), torch.cat(rows)

    @torch.no_grad()
    def reference(self, case: Case, layout: str = "original", deepstack: str = "kept",
                  kept: list[torch.Tensor] | None = None, forced: list[int] | None = None) -> Reference:
        """Greedy decoding of the pruned prompt. Controls: ``layout="base"`` puts every kept row at its run's first
        cell; ``deepstack="first"`` feeds the DeepStack levels the item's first rows instead of the kept ones.
        ``kept`` (per item) replaces the reference's own selection; ``forced`` decodes those tokens instead of the
        greedy ones (teacher forcing), scoring each."""
        kept_given = kept
        text, specs = PROMPTS[case.prompt]
        inputs = self.processed(text, specs)
        full_ids = inputs["input_ids"][0].tolist()
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
        positions = positions[:, 0]  # [3, L]
        end = int(positions.max()) + 1
        media = [self.media(spec) for spec in specs]
        instructions = self.instructions(self.tokenizer(text).input_ids)
        table = self.model.get_input_embeddings()
        pads = (self.image_id, self.video_id)
        embeds, kept_positions, pruned_ids, is_visual, levels, kept_all = [], [], [], [], None, []

        def keep_text(at: int) -> None:
            embeds.append(table(torch.tensor([full_ids[at]])))
            kept_positions.append(positions[:, at:at + 1])
            pruned_ids.append(full_ids[at])
            is_visual.append(False)

        index = item = 0
        while index < len(full_ids):
            if full_ids[index] not in pads:
                keep_text(index)
                index += 1
                continue
            current = media[item]
            kept, rows = self.select(current, instructions[item], case.budget, case.selector,
                                     None if kept_given is None else kept_given[item])
            kept_all.append(kept)
            quotas = torch.bincount(kept // current.frame_tokens, minlength=current.frames).tolist()
            taken = 0
            for frame in range(current.frames):  # runs of pads, one per frame, separated by timestamp text
                while full_ids[index] not in pads:
                    keep_text(index)
                    index += 1
                cells = positions[:, index:index + current.frame_tokens]
                frame_kept = kept[taken:taken + quotas[frame]] - frame * current.frame_tokens
                chosen = cells[:, frame_kept] if layout == "original" else cells[:, :1].expand(3, quotas[frame])
                embeds.append(rows[taken:taken + quotas[frame]])
                kept_positions.append(chosen)
                pruned_ids += [full_ids[index]] * quotas[frame]
                is_visual += [True] * quotas[frame]
                taken += quotas[frame]
                index += current.frame_tokens
            source = kept if deepstack == "kept" else torch.arange(len(kept))
            item_levels = [level[source] for level in current.deepstack]
            levels = item_levels if levels is None else [torch.cat(pair) for pair in zip(levels, item_levels,
                                                                                       strict=True)]
            item += 1
        embeds_all, pos = torch.cat(embeds), torch.cat(kept_positions, dim=1)
        mask = torch.tensor(is_visual)
        tokens, logprobs, top_logprobs = [], [], []
        for step in range(MAX_TOKENS):
            deepstack_inputs = ({"visual_pos_masks": mask[None], "deepstack_visual_embeds": levels}
                                if self.deepstack else {})
            hidden = self.model.model.language_model(
                inputs_embeds=embeds_all[None], position_ids=pos[:, None, :], use_cache=False, **deepstack_inputs,
            ).last_hidden_state
            scores = torch.log_softmax(self.model.lm_head(hidden[0, -1]).float(), dim=-1)
            token = int(torch.argmax(scores)) if forced is None else forced[step]
            tokens.append(token)
            logprobs.append(float(scores[token]))
            top_logprobs.append(float(scores.max()))
            embeds_all = torch.cat([embeds_all, table(torch.tensor([token]))])
            pos = torch.cat([pos, torch.full((3, 1), end + step)], dim=1)
            mask = torch.cat([mask, torch.tensor([False])])
        return Reference(pruned_ids, tokens, logprobs, top_logprobs, kept_all)


def request_spec(case: Case) -> dict[str, Any]:
    text, specs = PROMPTS[case.prompt]
    return runner_request(case, text, specs, MAX_TOKENS)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> Variant:
    return VARIANTS[request.param]


@pytest.fixture(scope="module")
def model_dir(variant: Variant, tmp_path_factory) -> Path:
    from textscythe_dev import tiny_qwen3_vl

    directory = tmp_path_factory.mktemp(f"tiny-{variant.name}-weights")
    if variant.name == "qwen3.5":
        return tiny_qwen3_vl.build_tiny_qwen3_5(directory, with_weights=True)
    return tiny_qwen3_vl.build_tiny_qwen3_vl(directory, moe=variant.name == "qwen3-vl-moe", with_weights=True)


@pytest.fixture(scope="module")
def hf(model_dir: Path, variant: Variant) -> HFReference:
    return HFReference(model_dir, variant)


@pytest.fixture(scope="module")
def plugin_process(model_dir: Path, variant: Variant, tmp_path_factory):
    run = OfflineRun(
        model_dir, tmp_path_factory.mktemp("qwen3-equivalence"), "plugin", [request_spec(case) for case in CASES],
        {"VLLM_PLUGINS": "textscythe"}, log_selections=True,
        llm_kwargs={"max_num_batched_tokens": CHUNK_TOKENS, "enable_chunked_prefill": True,
                    "limit_mm_per_prompt": {"image": 2, "video": 2}, "dtype": str(variant.dtype).split(".")[-1]},
    )
    yield run
    run.stop()


@pytest.fixture(scope="module")
def references(hf: HFReference, plugin_process) -> dict[str, Reference]:
    return {case.id: hf.reference(case) for case in CASES}  # computed while the engine runs


@pytest.fixture(scope="module")
def vllm_run(plugin_process, references) -> dict[str, Any]:
    return plugin_process.results(time.monotonic() + RUN_TIMEOUT_S)


def test_reference_prompt_layout(hf: HFReference):
    """The video prompt carries one timestamp and one run of pads per frame (what the per-frame quotas trim)."""
    inputs = hf.processed(PROMPTS["vid"][0], PROMPTS["vid"][1])
    ids = inputs["input_ids"][0].tolist()
    runs, count = [], 0
    for token in [*ids, -1]:
        if token == hf.video_id:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    assert runs == [20, 20, 20, 20]
    assert "seconds" in hf.tokenizer.decode(ids)


def engine_kept(vllm_run: dict[str, Any], hf: HFReference, case: Case) -> list[torch.Tensor] | None:
    """Per item of ``case``, the positions the engine kept in its solo run (the selection log's last record for the
    item's selector, budget and size: cases differ in at least one of them)."""
    if case.budget is None:
        return None
    kept = []
    for spec in PROMPTS[case.prompt][1]:
        size = hf.media(spec).rows.shape[0]
        records = [r for r in vllm_run["selections"]
                   if (r["selector"], r["budget"], r["num_tokens"]) == (case.selector, case.budget, size)]
        kept.append(torch.tensor(records[-1]["kept_positions"]))
    return kept


@pytest.fixture(scope="module")
def forced(hf: HFReference, vllm_run, variant) -> dict[str, Reference]:
    """bf16 only: the reference fed the rows the engine kept and scored on the engine's tokens (teacher forcing),
    so a near-tie that bf16 rounding breaks differently on the two sides does not end the comparison."""
    if variant.exact:
        return {}
    return {case.id: hf.reference(case, kept=engine_kept(vllm_run, hf, case),
                                  forced=vllm_run["solo"][case.id]["token_ids"]) for case in CASES}


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_vllm_matches_hf_reference(vllm_run, references, forced, variant, case_id):
    reference, got = references[case_id], vllm_run["solo"][case_id]
    assert got["prompt_token_ids"] == reference.prompt_token_ids
    if variant.exact:
        assert got["token_ids"] == reference.token_ids
    else:
        reference = forced[case_id]
        # every engine token is the reference's greedy choice, up to the tolerance
        margin = max(top - own for top, own in zip(reference.top_logprobs, reference.logprobs, strict=True))
        print(f"{variant.name} {case_id}: largest reference logprob above the engine's token {margin:.2e}")
        assert margin <= variant.logprob_atol
    difference = largest_difference(got["logprobs"], reference.logprobs)
    print(f"{variant.name} {case_id}: max |logprob difference| = {difference:.2e}")
    assert difference <= variant.logprob_atol


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_batch_with_mixed_budgets_equals_solo(vllm_run, case_id):
    assert_same_generation(vllm_run["batch"][case_id], vllm_run["solo"][case_id])


def test_engine_kept_positions_match_hf(vllm_run, references, hf, variant):
    if variant.exact:
        expected = {(case.selector, case.budget, tuple(int(i) for i in kept))
                    for case in CASES if case.budget is not None for kept in references[case.id].kept}
        logged = {(r["selector"], r["budget"], tuple(r["kept_positions"])) for r in vllm_run["selections"]}
        assert logged == expected
        return
    # bf16: the engine's rows and attention differ from the reference's by rounding, which breaks near-ties
    # (an anchor word, the last of a frame's few tokens) differently; exact equality is proven in float32
    shared_all = kept_all = 0
    for case in (case for case in CASES if case.budget is not None):
        for ours, engine in zip(references[case.id].kept, engine_kept(vllm_run, hf, case), strict=True):
            shared = len(set(ours.tolist()) & set(engine.tolist()))
            print(f"{variant.name} {case.id}: {shared}/{len(engine)} kept positions shared")
            assert len(ours) == len(engine) and 2 * shared >= len(engine), case.id
            shared_all, kept_all = shared_all + shared, kept_all + len(engine)
    assert shared_all >= BF16_SHARED_SELECTION * kept_all, (shared_all, kept_all)


def first_rows(media: Media, kept: torch.Tensor) -> torch.Tensor:
    """Another choice with the same per-frame quotas as ``kept``: each frame's first rows."""
    quotas = torch.bincount(kept // media.frame_tokens, minlength=media.frames).tolist()
    return torch.cat([frame * media.frame_tokens + torch.arange(quota) for frame, quota in enumerate(quotas)])


def test_positions_rows_and_deepstack_are_what_the_comparison_sees(hf: HFReference, vllm_run, variant):
    """Guards against a vacuous pass: wrong positions, another choice of rows, or DeepStack levels fed other rows
    move vLLM's log-probabilities far more than the tolerance. (bf16: the tiny Qwen3.5 has one full-attention layer
    rotating a quarter of each head, so positions move it less; its position control is the 40-token image's, where
    the kept rows spread over the grid, and the other cases' control is the choice of rows.)"""
    for case_id in ("img-textscythe-40", "vid-textscythe-30", "img-vid-textscythe-12"):
        got, case = vllm_run["solo"][case_id], BY_ID[case_id]
        kept = engine_kept(vllm_run, hf, case)
        inputs = {} if variant.exact else {"kept": kept, "forced": got["token_ids"]}
        others = [first_rows(hf.media(spec), item) for spec, item in zip(PROMPTS[case.prompt][1], kept, strict=True)]
        controls = {"rows": hf.reference(case, **{**inputs, "kept": others})}
        if variant.exact or case_id == "img-textscythe-40":
            controls["positions"] = hf.reference(case, layout="base", **inputs)
        if variant.deepstack:
            controls["deepstack"] = hf.reference(case, deepstack="first", **inputs)
        for name, control in controls.items():
            difference = largest_difference(got["logprobs"], control.logprobs)
            print(f"{variant.name} {case_id}: {name} control difference {difference:.2e}")
            assert difference > variant.control_floor, (case_id, name)


def test_no_layout_errors_logged(vllm_run):
    assert "M-RoPE layout of a pruned request failed" not in vllm_run["log"]
    assert "keep their item's base position" not in vllm_run["log"]
    assert "falling back" not in vllm_run["log"]
