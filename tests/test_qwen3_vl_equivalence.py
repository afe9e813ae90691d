"""Qwen3-VL (dense and MoE) pruning in vLLM against an independent transformers reference: images, timestamped
videos, both, DeepStack, interleaved M-RoPE, chunked prefill.

One tiny Qwen3-VL checkpoint (and one Qwen3-VL-MoE) with random, seeded float32 weights (``textscythe_dev.tiny_qwen3_vl``) runs in vLLM
offline with the plugin (``textscythe_dev.offline`` in a subprocess) with chunked prefill on and
``max_num_batched_tokens=64`` (images and videos split across prefill steps): one batched ``LLM.generate`` with
every case, then every case alone. The reference, here, with transformers' own Qwen3-VL:

* the expanded prompt (timestamps included) from the checkpoint's HF processor and its 3-D positions from
  transformers' ``get_rope_index``;
* the vision rows (main merger and every DeepStack level) from ``get_image_features``, and the attention the
  selectors read from HF's eager attention weights at the tower's last block (mean over heads and queries of
  each patch's frame, then over each merged row's 4 patches);
* the instruction (the user message's words, rule written here), the selection (``get_selector(...).select``;
  videos frame by frame with :func:`spread_budget` quotas);
* greedy decoding from ``inputs_embeds`` of the pruned prompt with every kept row at its ORIGINAL position, every
  text token at its unpruned position, and every DeepStack level fed exactly the kept rows.

Compared: prompt ids, greedy tokens (identical), log-probabilities (within 1e-4), kept positions (selection log).
Controls: kept rows at wrong positions, or DeepStack levels fed from other rows, move the log-probabilities far more
than the tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from textscythe_dev.images import scene
from textscythe_dev.offline import finish_runner, read_selection_log, start_runner, stop_runner
from textscythe_dev.reference import user_message_instructions
from textscythe_vllm.processing import spread_budget
from textscythe_vllm.pruning import SELECTION_LOG_ENV
from textscythe_vllm.selectors import get_selector

pytestmark = pytest.mark.server

MAX_TOKENS = 6
RUN_TIMEOUT_S = 480
CHUNK_TOKENS = 64
LOGPROB_ATOL = 1e-4

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
class Case:
    id: str
    prompt: str
    budget: int | None = None
    selector: str = "textscythe"


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
    logprobs: list[float]
    kept: list[torch.Tensor]


class HFReference:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(  # Qwen3-VL or Qwen3-VL-MoE
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        config = self.model.config
        self.image_id, self.video_id = config.image_token_id, config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self.user_opener = self.tokenizer.encode("<|im_start|>user", add_special_tokens=False)
        self.turn_end = self.tokenizer.encode("<|im_end|>", add_special_tokens=False)
        self.excluded = set(self.tokenizer.all_special_ids) | {self.image_id, self.video_id}
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
            visual = self.model.model.visual
            target = visual.blocks[-1].attn
            original = modeling.eager_attention_forward
            weights: list[torch.Tensor] = []

            def capture(module, *args, **kwargs):
                output, attention = original(module, *args, **kwargs)
                if module is target:
                    weights.append(attention)  # [1, heads, L, L], one frame (or the image)
                return output, attention

            modeling.eager_attention_forward = capture
            try:
                out = self.model.model.get_image_features(pixels, grid)
            finally:
                modeling.eager_attention_forward = original
            t, h, w = grid[0].tolist()
            assert len(weights) == t and all(x.shape[-1] == h * w for x in weights)
            patches = torch.cat([x[0].mean(dim=0).mean(dim=0) for x in weights])  # merge-block order
            attention = patches.reshape(-1, self.merge**2).mean(dim=1)
            self._media[key] = Media(out.pooler_output[0], [level[0] for level in out.deepstack_features], attention,
                                     t, h * w // self.merge**2)
        return self._media[key]

    def instructions(self, ids: list[int]) -> list[list[int]]:
        """Per item: the ids of its user message (ChatML delimiters) minus special/pad ids."""
        return user_message_instructions(ids, self.user_opener, self.turn_end, (self.image_id, self.video_id),
                                         self.excluded)

    @torch.no_grad()
    def select(self, media: Media, instruction: list[int], budget: int | None, selector: str) -> torch.Tensor:
        """``(kept [K] ascending, rows [K, D])``: per frame with its quota (an image is one frame)."""
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
    def reference(self, case: Case, layout: str = "original", deepstack: str = "kept") -> Reference:
        """Greedy decoding of the pruned prompt. Controls: ``layout="base"`` puts every kept row at its run's first
        cell; ``deepstack="first"`` feeds the DeepStack levels the item's first rows instead of the kept ones."""
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
        index = item = 0
        while index < len(full_ids):
            if full_ids[index] not in pads:
                embeds.append(table(torch.tensor([full_ids[index]])))
                kept_positions.append(positions[:, index:index + 1])
                pruned_ids.append(full_ids[index])
                is_visual.append(False)
                index += 1
                continue
            current = media[item]
            kept, rows = self.select(current, instructions[item], case.budget, case.selector)
            kept_all.append(kept)
            quotas = torch.bincount(kept // current.frame_tokens, minlength=current.frames).tolist()
            taken = 0
            for frame in range(current.frames):  # runs of pads, one per frame, separated by timestamp text
                while full_ids[index] not in pads:
                    embeds.append(table(torch.tensor([full_ids[index]])))
                    kept_positions.append(positions[:, index:index + 1])
                    pruned_ids.append(full_ids[index])
                    is_visual.append(False)
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
        tokens, logprobs = [], []
        for step in range(MAX_TOKENS):
            hidden = self.model.model.language_model(
                inputs_embeds=embeds_all[None], position_ids=pos[:, None, :], visual_pos_masks=mask[None],
                deepstack_visual_embeds=levels, use_cache=False,
            ).last_hidden_state
            logits = self.model.lm_head(hidden[0, -1]).float()
            token = int(torch.argmax(logits))
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
            embeds_all = torch.cat([embeds_all, table(torch.tensor([token]))])
            pos = torch.cat([pos, torch.full((3, 1), end + step)], dim=1)
            mask = torch.cat([mask, torch.tensor([False])])
        return Reference(pruned_ids, tokens, logprobs, kept_all)


def request_spec(case: Case) -> dict[str, Any]:
    text, specs = PROMPTS[case.prompt]
    strip = [{k: v for k, v in spec.items() if k != "kind"} for spec in specs]
    kwargs = None if case.budget is None else {"visual_token_budget": case.budget,
                                               "visual_token_selector": case.selector}
    return {
        "id": case.id, "prompt": text,
        "images": [s for s, spec in zip(strip, specs, strict=True) if spec["kind"] == "image"],
        "videos": [s for s, spec in zip(strip, specs, strict=True) if spec["kind"] == "video"],
        "mm_processor_kwargs": kwargs, "max_tokens": MAX_TOKENS,
    }


@pytest.fixture(scope="module", params=["dense", "moe"])
def model_dir(request, tmp_path_factory) -> Path:
    """Qwen3-VL, then Qwen3-VL-MoE (the same tower, DeepStack and positions; sparse-MoE LLM layers)."""
    from textscythe_dev.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp(f"tiny-qwen3-vl-{request.param}-weights"),
                               moe=request.param == "moe", with_weights=True)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> HFReference:
    return HFReference(model_dir)


@pytest.fixture(scope="module")
def plugin_process(model_dir: Path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qwen3-equivalence")
    run = start_runner(
        model_dir, workdir, "plugin", [request_spec(case) for case in CASES],
        {"VLLM_PLUGINS": "textscythe", SELECTION_LOG_ENV: str(workdir / "selections.jsonl")},
        llm_kwargs={"max_num_batched_tokens": CHUNK_TOKENS, "enable_chunked_prefill": True,
                    "limit_mm_per_prompt": {"image": 2, "video": 2}},
    )
    yield run, workdir
    stop_runner(run[0])


@pytest.fixture(scope="module")
def references(hf: HFReference, plugin_process) -> dict[str, Reference]:
    return {case.id: hf.reference(case) for case in CASES}  # computed while the engine runs


@pytest.fixture(scope="module")
def vllm_run(plugin_process, references) -> dict[str, Any]:
    (process, output, log_path), workdir = plugin_process
    results = finish_runner(process, output, log_path, time.monotonic() + RUN_TIMEOUT_S)
    return {"batch": {entry["id"]: entry for entry in results["batch"]},
            "solo": {entry["id"]: entry for entry in results["solo"]},
            "selections": read_selection_log(workdir / "selections.jsonl"),
            "log": log_path.read_text(errors="replace")}


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


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_vllm_matches_hf_reference(vllm_run, references, case_id):
    reference, got = references[case_id], vllm_run["solo"][case_id]
    assert got["prompt_token_ids"] == reference.prompt_token_ids
    assert got["token_ids"] == reference.token_ids
    difference = max(abs(a - b) for a, b in zip(got["logprobs"], reference.logprobs, strict=True))
    print(f"{case_id}: max |logprob difference| = {difference:.2e}")
    assert difference <= LOGPROB_ATOL


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_batch_with_mixed_budgets_equals_solo(vllm_run, case_id):
    batch, solo = vllm_run["batch"][case_id], vllm_run["solo"][case_id]
    assert batch["prompt_token_ids"] == solo["prompt_token_ids"] and batch["token_ids"] == solo["token_ids"]


def test_engine_kept_positions_match_hf(vllm_run, references):
    expected = {(case.selector, case.budget, tuple(int(i) for i in kept))
                for case in CASES if case.budget is not None for kept in references[case.id].kept}
    logged = {(r["selector"], r["budget"], tuple(r["kept_positions"])) for r in vllm_run["selections"]}
    assert logged == expected


def test_positions_and_deepstack_are_what_the_comparison_sees(hf: HFReference, vllm_run):
    """Guards against a vacuous pass: wrong positions, or DeepStack levels fed other rows, move vLLM's
    log-probabilities far more than the tolerance."""
    for case_id in ("img-textscythe-40", "vid-textscythe-30", "img-vid-textscythe-12"):
        got = vllm_run["solo"][case_id]["logprobs"]
        for control in (hf.reference(BY_ID[case_id], layout="base"), hf.reference(BY_ID[case_id], deepstack="first")):
            assert max(abs(a - b) for a, b in zip(got, control.logprobs, strict=True)) > 20 * LOGPROB_ATOL, case_id


def test_no_layout_errors_logged(vllm_run):
    assert "M-RoPE layout of a pruned request failed" not in vllm_run["log"]
    assert "keep their item's base position" not in vllm_run["log"]
    assert "falling back" not in vllm_run["log"]
