"""End-to-end equivalence of pruning in vLLM against an independent transformers reference.

One tiny LLaVA-1.5 checkpoint with real (random, seeded) float32 weights is run three ways:

* vLLM offline with the plugin (``textscythe_dev.offline`` in a subprocess: one batched ``LLM.generate`` with
  every case, then every case alone), plus a probe that reads the plugin model's own [CLS] attention and
  pruned rows inside the worker;
* stock vLLM (``VLLM_PLUGINS=``, same runner) on the cases without a budget;
* transformers, in this process: image features and the CLIP [CLS] attention from the HF model, the
  instruction ids from the tokenizer (rule written in ``textscythe_dev.reference``, independently of
  ``textscythe_vllm.processing``), the selection from ``get_selector(...).select``, and greedy decoding from
  ``inputs_embeds`` of the pruned prompt.

Compared: greedy tokens (identical), each generated token's log-probability (close), the pruned prompt's
token ids (identical), the positions the worker kept for every pruned image and its instruction length
(``$TEXTSCYTHE_SELECTION_LOG``; identical to the reference's), the plugin's [CLS] attention / features /
pruned rows (close), stock vs plugin without a budget (identical), batch vs solo (identical).

The two engines run at the same time, one core each, while the reference is computed (~100 s in all on a
2-core machine).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from textscythe_dev.images import scene
from textscythe_dev.offline import Case, OfflineRun, assert_same_generation, runner_request
from textscythe_dev.reference import (
    eager_checkpoint,
    greedy_decode,
    largest_difference,
    user_message_instructions,
)
from textscythe_vllm.selectors import get_selector

pytestmark = pytest.mark.server

IMAGE_TOKENS = 576  # 336 px / 14 px patches, [CLS] dropped
MAX_TOKENS = 8
RUN_TIMEOUT_S = 420
# float32 on both sides: HF (eager attention) and vLLM (CPU kernels) agree to ~1e-6 in log-probabilities
# (first-step top-1/top-2 logit margins here are >= 1e-3), ~1e-9 in [CLS] attention (values ~1.3e-3 to
# 2.5e-3, nearly uniform with random weights, so the tolerance must be far below their spread) and ~6e-8 in
# the projected features.
LOGPROB_ATOL = 1e-5
ATTENTION_ATOL = 1e-7
FEATURE_ATOL = 1e-6

# prompt name -> (text, image seeds in prompt order)
PROMPTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "one": ("USER: <image>\nwhat colour is the umbrella next to the red car ? ASSISTANT:", (11,)),
    "two": ("USER: <image>\n<image>\nis there a dog on the grass between the two trees ? ASSISTANT:", (12, 13)),
    # two turns, one image each: each image's instruction ends at the generation prompt of its own turn
    "turns": (
        "USER: <image>\nwhat colour is the car ? ASSISTANT: it is red</s>"
        "USER: <image>\nand the dog on the left ? ASSISTANT:",
        (14, 15),
    ),
}


def _budget_cases() -> list[Case]:
    cases = [
        Case(f"one-{selector}-{budget}", "one", budget, selector)
        for selector in ("textscythe", "cls_attention")
        for budget in (1, 64, 192)
    ]
    cases += [Case(f"one-{selector}-64", "one", 64, selector) for selector in ("visionzip", "divprune", "icctp")]
    cases += [
        Case("one-textscythe-576", "one", IMAGE_TOKENS),  # budget == N and > N: nothing is pruned
        Case("one-textscythe-1000", "one", 1000),
        Case("two-textscythe-64", "two", 64),
        Case("two-cls_attention-192", "two", 192, "cls_attention"),
        Case("turns-textscythe-64", "turns", 64),
        Case("turns-textscythe-1", "turns", 1),
    ]
    return cases


UNPRUNED_CASES = [Case(f"{name}-full", name) for name in PROMPTS]
CASES = UNPRUNED_CASES + _budget_cases()
CASE_IDS = [case.id for case in CASES]
BY_ID = {case.id: case for case in CASES}
# model-side probe: (image seed, budget, selector); instructions come from the HF reference
PROBES = [(11, 64, "textscythe"), (11, 192, "cls_attention"), (12, 64, "visionzip"), (15, 1, "textscythe")]


# ----------------------------------------------------------------------------------------------------------
# transformers reference
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    prompt_token_ids: list[int]  # the prompt with each image expanded to its kept rows
    token_ids: list[int]
    logprobs: list[float]
    first_logits: torch.Tensor  # [V] logits after the prompt
    indices: list[torch.Tensor]  # per image: kept positions
    instructions: list[list[int]]  # per image: instruction token ids


class HFReference:
    def __init__(self, model_dir: Path) -> None:
        from transformers import LlavaForConditionalGeneration

        self.processor, self.model = eager_checkpoint(LlavaForConditionalGeneration, model_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        # LLaVA-1.5's generation prompt; the checkpoint's chat template must end an open turn with it.
        self.marker = self.tokenizer.encode("ASSISTANT:", add_special_tokens=False)
        self.user_opener = self.tokenizer.encode("USER:", add_special_tokens=False)
        self.excluded = set(self.tokenizer.all_special_ids) | {self.image_id}
        self._images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pixel_values(self, seed: int) -> torch.Tensor:
        return self.processor.image_processor(images=[scene(seed)], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features ``[576, D]`` and [CLS] attention ``[576]`` of ``scene(seed)``."""
        if seed not in self._images:
            pixel_values = self.pixel_values(seed)
            config = self.model.config
            features = self.model.get_image_features(
                pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output[0]
            tower = self.model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
            # The feature layer is the one whose output is hidden_states[-2] (hidden_states[0] is the
            # embedding output), i.e. attentions[-2]: [1, heads, 1 + 576, 1 + 576].
            assert len(tower.attentions) == len(tower.hidden_states) - 1
            attention = tower.attentions[-2][0].mean(dim=0)[0, 1:]  # [CLS] query row, [CLS] key dropped
            self._images[seed] = (features, attention)
        return self._images[seed]

    def instructions(self, ids: list[int]) -> list[list[int]]:
        """Per image token: the ids of its user message -- after the last "USER:" before it, up to the first
        "ASSISTANT:" after it -- minus special/image ids (LLaVA-1.5's template)."""
        return user_message_instructions(ids, self.user_opener, self.marker, {self.image_id}, self.excluded)

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))

    @torch.no_grad()
    def select(self, seed: int, instruction: list[int], budget: int | None, selector: str) -> Any:
        features, attention = self.image(seed)
        if budget is None or budget >= features.shape[0]:
            return torch.arange(features.shape[0]), features
        result = get_selector(selector).select(features, self.embed(instruction), attention, budget)
        return result.indices, result.embeddings

    @torch.no_grad()
    def reference(self, case: Case, selector: str | None = None) -> Reference:
        text, seeds = PROMPTS[case.prompt]
        ids = self.tokenizer(text).input_ids
        instructions = self.instructions(ids)
        assert len(instructions) == len(seeds)
        table = self.model.get_input_embeddings()
        pieces, expanded, indices, image = [], [], [], 0
        for token in ids:
            if token != self.image_id:
                pieces.append(table(torch.tensor([token])))
                expanded.append(token)
                continue
            kept, rows = self.select(seeds[image], instructions[image], case.budget, selector or case.selector)
            pieces.append(rows)
            expanded += [self.image_id] * rows.shape[0]
            indices.append(kept)
            image += 1
        embeds = torch.cat(pieces)

        def next_logits(generated: list[int]) -> torch.Tensor:
            sequence = torch.cat([embeds, table(torch.tensor(generated, dtype=torch.long))])
            return self.model(inputs_embeds=sequence[None], use_cache=False).logits[0, -1]

        tokens, logprobs, first_logits = greedy_decode(next_logits, MAX_TOKENS)
        return Reference(expanded, tokens, logprobs, first_logits, indices, instructions)


# ----------------------------------------------------------------------------------------------------------
# vLLM runs (subprocesses)
# ----------------------------------------------------------------------------------------------------------


def request_spec(case: Case) -> dict[str, Any]:
    text, seeds = PROMPTS[case.prompt]
    return runner_request(case, text, [{"kind": "image", "seed": seed} for seed in seeds], MAX_TOKENS)


@pytest.fixture(scope="module")
def hf(tiny_llava_weights_dir: Path) -> HFReference:
    return HFReference(tiny_llava_weights_dir)


@pytest.fixture(scope="module")
def probe_spec(hf: HFReference) -> list[dict[str, Any]]:
    seed_instruction = {}
    for text, seeds in PROMPTS.values():
        seed_instruction.update(zip(seeds, hf.instructions(hf.tokenizer(text).input_ids), strict=True))
    return [
        {"image": {"seed": seed}, "budget": budget, "selector": selector, "instruction": seed_instruction[seed]}
        for seed, budget, selector in PROBES
    ]


@pytest.fixture(scope="module")
def vllm_processes(tiny_llava_weights_dir: Path, probe_spec, tmp_path_factory):
    """Start both engines at once, one core each (the plugin run, and stock vLLM on the unpruned cases)."""
    workdir = tmp_path_factory.mktemp("equivalence")
    runs = {
        # every selection the plugin's worker makes (engine and probe), one JSON record per pruned image
        "plugin": OfflineRun(
            tiny_llava_weights_dir, workdir, "plugin", [request_spec(case) for case in CASES],
            {"VLLM_PLUGINS": "textscythe", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
             "VLLM_CPU_OMP_THREADS_BIND": "0"},
            log_selections=True, probe=probe_spec,
        ),
        "stock": OfflineRun(
            tiny_llava_weights_dir, workdir, "stock", [request_spec(case) for case in UNPRUNED_CASES],
            {"VLLM_PLUGINS": "", "VLLM_CPU_OMP_THREADS_BIND": str(min(1, (os.cpu_count() or 1) - 1))},
        ),
    }
    yield runs, time.monotonic() + RUN_TIMEOUT_S
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def references(hf: HFReference, vllm_processes) -> dict[str, Reference]:
    # Requests vllm_processes first so that the engines start while the reference is computed.
    return {case.id: hf.reference(case) for case in CASES}


@pytest.fixture(scope="module")
def vllm_runs(vllm_processes) -> dict[str, dict[str, Any]]:
    """{"plugin": ..., "stock": ...}: per run, "batch" and "solo" entries keyed by case id, "probe", "timings";
    the plugin's "selections"."""
    runs, deadline = vllm_processes
    return {name: run.results(deadline) for name, run in runs.items()}


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------


def test_instruction_rule_and_marker_match_the_checkpoint(hf: HFReference):
    # The marker the reference uses is what the chat template appends for an open assistant turn.
    rendered = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("ASSISTANT:")
    ids = hf.tokenizer(PROMPTS["turns"][0]).input_ids
    first, second = hf.instructions(ids)
    words = hf.tokenizer.convert_ids_to_tokens
    assert words(first) == ["what", "colour", "is", "the", "car", "?"]
    # the second image's instruction is its own user message only: no role words, no earlier turns
    assert words(second) == ["and", "the", "dog", "on", "the", "left", "?"]


def test_hf_reference_matches_hf_own_forward(hf: HFReference, references):
    """The reference's hand-built inputs_embeds reproduce HF's own LLaVA forward on the processor's output."""
    text, (seed,) = PROMPTS["one"]
    inputs = hf.processor(text=text, images=[scene(seed)], return_tensors="pt")
    reference = references["one-full"]
    assert inputs["input_ids"][0].tolist() == reference.prompt_token_ids
    with torch.no_grad():
        logits = hf.model(**inputs).logits[0, -1].float()
    torch.testing.assert_close(logits, reference.first_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_id", [case.id for case in UNPRUNED_CASES])
def test_no_budget_is_stock_vllm(vllm_runs, case_id):
    for mode in ("solo", "batch"):
        assert_same_generation(vllm_runs["plugin"][mode][case_id], vllm_runs["stock"][mode][case_id], mode)
    # same engine code, same batch (a single request): bit-identical log-probabilities
    assert vllm_runs["plugin"]["solo"][case_id]["logprobs"] == vllm_runs["stock"]["solo"][case_id]["logprobs"]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_vllm_matches_hf_reference(vllm_runs, references, case_id):
    reference = references[case_id]
    got = vllm_runs["plugin"]["solo"][case_id]
    case = BY_ID[case_id]
    kept = min(case.budget or IMAGE_TOKENS, IMAGE_TOKENS)
    assert [len(indices) for indices in reference.indices] == [kept] * len(PROMPTS[case.prompt][1])
    assert got["prompt_token_ids"] == reference.prompt_token_ids
    assert got["token_ids"] == reference.token_ids
    assert largest_difference(got["logprobs"], reference.logprobs) <= LOGPROB_ATOL


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_batch_with_mixed_budgets_equals_solo(vllm_runs, case_id):
    assert_same_generation(vllm_runs["plugin"]["batch"][case_id], vllm_runs["plugin"]["solo"][case_id])


def test_budget_at_or_above_n_is_unpruned(vllm_runs):
    full = vllm_runs["plugin"]["solo"]["one-full"]
    for case_id in ("one-textscythe-576", "one-textscythe-1000"):
        got = vllm_runs["plugin"]["solo"][case_id]
        assert got["prompt_token_ids"] == full["prompt_token_ids"]
        assert got["token_ids"] == full["token_ids"]


def test_comparisons_can_tell_selections_apart(hf: HFReference, references, vllm_runs):
    """Guards against a vacuous pass: pruning changes the output, and a different selection is detected."""
    one = [references[f"one-textscythe-{k}"].token_ids for k in (1, 64, 192)] + [references["one-full"].token_ids]
    assert len({tuple(tokens) for tokens in one}) > 1
    assert any(len(set(tokens)) > 1 for tokens in one)
    # The selectors really choose different rows here...
    assert not torch.equal(references["one-textscythe-64"].indices[0], references["one-cls_attention-64"].indices[0])
    assert not torch.equal(references["one-textscythe-64"].indices[0], torch.arange(64))
    # ...and vLLM's log-probabilities match the selection asked for, not another one of the same size.
    for case_id, other in (("one-textscythe-64", "uniform"), ("one-cls_attention-192", "textscythe"),
                           ("two-textscythe-64", "cls_attention")):
        wrong = hf.reference(BY_ID[case_id], selector=other).logprobs
        got = vllm_runs["plugin"]["solo"][case_id]["logprobs"]
        assert largest_difference(got, wrong) > 10 * LOGPROB_ATOL, (case_id, other)


def test_engine_kept_positions_match_hf(hf: HFReference, vllm_runs, references, probe_spec):
    """End to end: the positions the worker kept for each image (instruction from the processor, attention
    from the probe, selection) are exactly the reference's, and the instruction has the reference's length."""
    def key(selector: str, budget: int, instruction: list[int], kept: Any) -> tuple:
        return selector, budget, len(instruction), tuple(int(i) for i in kept)

    expected = set()
    for case in CASES:
        if case.budget is not None and case.budget < IMAGE_TOKENS:
            reference = references[case.id]
            expected |= {
                key(case.selector, case.budget, instruction, kept)
                for instruction, kept in zip(reference.instructions, reference.indices, strict=True)
            }
    logged = {
        (r["selector"], r["budget"], r["instruction_tokens"], tuple(r["kept_positions"]))
        for r in vllm_runs["plugin"]["selections"]
    }
    assert all(r["num_tokens"] == IMAGE_TOKENS for r in vllm_runs["plugin"]["selections"])
    missing = expected - logged
    assert not missing, f"{len(missing)} of {len(expected)} reference selections never made by the engine"
    # ...and nothing else was selected, apart from the probe's own calls (with the reference's instructions)
    for entry in probe_spec:
        kept, _ = hf.select(entry["image"]["seed"], entry["instruction"], entry["budget"], entry["selector"])
        expected.add(key(entry["selector"], entry["budget"], entry["instruction"], kept))
    assert logged == expected


def test_plugin_attention_features_and_rows_match_hf(hf: HFReference, vllm_runs, probe_spec):
    probes = vllm_runs["plugin"]["probe"]
    assert len(probes) == len(PROBES)
    for entry, got in zip(probe_spec, probes, strict=True):
        seed = entry["image"]["seed"]
        features, attention = hf.image(seed)
        torch.testing.assert_close(torch.tensor(got["attention"]), attention, atol=ATTENTION_ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(got["features"]), features, atol=FEATURE_ATOL, rtol=0)
        _, rows = hf.select(seed, entry["instruction"], entry["budget"], entry["selector"])
        assert len(got["rows"]) == entry["budget"]
        torch.testing.assert_close(torch.tensor(got["rows"]), rows, atol=FEATURE_ATOL, rtol=0)
