"""Unit tests of the vLLM glue that need no server: plans, instruction rule, prompt updates, row choice,
LLaVA-NeXT layout, version pin."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from textscythe_vllm import pruning
from textscythe_vllm.instruction import (
    TemplateMarkers,
    TokenizerFacts,
    find_subsequence,
    instruction_token_ids,
)
from textscythe_vllm.processing import (
    ItemPlan,
    embed_runs,
    prune_prompt_update,
    spread_budget,
    strip_private_kwargs,
)
from textscythe_vllm.request import PruningRequest, PruningRequestError
from textscythe_vllm.selectors import available_selectors


def test_plan_roundtrip_and_cache_key():
    plan = ItemPlan(budget=64, selector="textscythe", instruction=(5, 9, 11))
    assert ItemPlan.decode(plan.encode()) == plan
    other_question = ItemPlan(budget=64, selector="textscythe", instruction=(5, 9, 12))
    other_budget = ItemPlan(budget=65, selector="textscythe", instruction=(5, 9, 11))
    other_selector = ItemPlan(budget=64, selector="divprune", instruction=(5, 9, 11))
    keys = {p.cache_key() for p in (plan, other_question, other_budget, other_selector)}
    assert len(keys) == 4
    for name in available_selectors():
        assert ItemPlan.decode(ItemPlan(3, name, ()).encode()).selector == name


def test_request_parsing():
    assert PruningRequest.from_kwargs({}) is None
    assert PruningRequest.from_kwargs({"visual_token_selector": "random"}) is None
    assert PruningRequest.from_kwargs({"visual_token_budget": 7}) == PruningRequest(7, "textscythe")
    for bad in (0, -1, 1.0, True, "7", None, [7]):
        with pytest.raises(PruningRequestError) as caught:
            PruningRequest.from_kwargs({"visual_token_budget": bad})
        assert caught.value.param == "visual_token_budget"
    with pytest.raises(PruningRequestError):
        PruningRequest.from_kwargs({"visual_token_budget": 3, "visual_token_selector": "nope"})
    assert strip_private_kwargs({"visual_token_budget": 3, "size": 1, "_textscythe_request": "t"}) == {"size": 1}


def test_find_subsequence():
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3], 0) == 1
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3], 2) == 3
    assert find_subsequence([1, 2, 3], [4], 0) == 3
    assert find_subsequence([1, 2, 3], [], 0) == 3


def test_instruction_rule_single_and_multi_turn():
    IMAGE, BOS, USER, ASSISTANT, COLON, EOS = 4, 1, 49, 50, 51, 2
    excluded = frozenset({IMAGE, BOS, EOS})
    markers = TemplateMarkers(user_open=(USER, COLON), ends=((ASSISTANT, COLON), (USER, COLON)))
    # BOS sys1 sys2 USER : <image> q1 q2 ASSISTANT : a1 EOS USER : <image> q3 ASSISTANT :
    prompt = [BOS, 60, 61, USER, COLON, IMAGE, 20, 21, ASSISTANT, COLON, 30, EOS, USER, COLON, IMAGE, 22, ASSISTANT,
              COLON]
    first_image, second_image = 5, 14
    instructions = instruction_token_ids(prompt, [first_image, second_image], excluded_ids=excluded, markers=markers)
    # Each image: the words of its own user message -- no system text, no role words, no earlier turns.
    assert instructions == [(20, 21), (22,)]
    # Adding turns after an image never changes that image's instruction (prefix-cache stability).
    longer = [*prompt, 40, EOS, USER, COLON, 23, ASSISTANT, COLON]
    assert instruction_token_ids(longer, [first_image], excluded_ids=excluded, markers=markers)[0] == instructions[0]
    # No chat template (no markers): the whole prompt's text tokens.
    assert instruction_token_ids(prompt, [5], excluded_ids=excluded, markers=TemplateMarkers())[0] == tuple(
        t for t in prompt if t not in excluded
    )


def test_markers_of_tiny_tokenizer(tiny_llava_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    _, markers = TokenizerFacts().get(tokenizer, [4])
    assert tokenizer.decode(list(markers.user_open)).replace(" ", "").lower() == "user:"
    assert any(tokenizer.decode(list(end)).replace(" ", "").lower() == "assistant:" for end in markers.ends)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is it ?"}], tokenize=True, add_generation_prompt=True
    )
    ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert find_subsequence(list(ids), markers.user_open, 0) < len(ids)


@dataclass
class _Details:
    full: list[int]
    is_embed: object = None


@dataclass(frozen=True)
class _Update:
    content: _Details


def test_prune_prompt_update_keeps_non_embedding_tokens():
    plain = _Update(_Details([7] * 10))
    assert prune_prompt_update(plain, 4).content.full == [7] * 4
    assert prune_prompt_update(plain, 10) is plain
    wrapped = _Update(_Details([1] + [7] * 10 + [2], is_embed=lambda full: torch.tensor(full) == 7))
    assert prune_prompt_update(wrapped, 3).content.full == [1, 7, 7, 7, 2]


def test_spread_budget_is_even_capped_and_exact():
    assert spread_budget(10, [4, 4, 4]) == [4, 3, 3]
    assert spread_budget(7, [1, 10, 10]) == [1, 3, 3]
    assert spread_budget(100, [4, 5]) == [4, 5]
    assert spread_budget(2, [3, 3, 3]) == [1, 1, 0]
    for budget in range(0, 30):
        for sizes in ([5], [3, 0, 7], [2, 9, 1, 4]):
            quotas = spread_budget(budget, sizes)
            assert sum(quotas) == min(budget, sum(sizes)) and all(0 <= q <= n for q, n in zip(quotas, sizes, strict=True))


def test_prune_prompt_update_spreads_over_frames_and_keeps_timestamps():
    # two frames, each "<ts> <start> 7 7 7 7 <end>": 3 kept -> 2 in the first frame, 1 in the second
    frame = [50, 1, 7, 7, 7, 7, 2]
    update = _Update(_Details([*frame, 51, *frame[1:]], is_embed=lambda full: torch.tensor(full) == 7))
    assert embed_runs([token == 7 for token in update.content.full]) == [4, 4]
    assert prune_prompt_update(update, 3).content.full == [50, 1, 7, 7, 2, 51, 1, 7, 2]
    assert prune_prompt_update(update, 1).content.full == [50, 1, 7, 2, 51, 1, 2]


def test_segmented_selection_keeps_each_segments_quota():
    features = _features(30)
    plan = ItemPlan(budget=7, selector="divprune", instruction=())
    rows, positions = pruning.choose_rows_and_positions(features, None, features[:0], plan, segments=[10, 10, 10])
    assert rows.shape == (7, 16) and positions.tolist() == sorted(positions.tolist())
    per_segment = torch.bincount(positions // 10, minlength=3).tolist()
    assert per_segment == spread_budget(7, [10, 10, 10]) == [3, 2, 2]
    assert torch.equal(rows, features[positions])


def test_segmented_fallback_keeps_the_quotas(monkeypatch):
    monkeypatch.setenv(pruning.FAULT_INJECTION_ENV, "1")
    features = _features(12)
    _, positions = pruning.choose_rows_and_positions(features, None, features[:0], ItemPlan(5, "textscythe", ()),
                                                     segments=[4, 8])
    assert spread_budget(5, [4, 8]) == [3, 2]
    assert positions.shape == (5,) and int((positions < 4).sum()) == 3


def _features(n: int = 48, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("selector", available_selectors())
def test_choose_rows_count_and_rows(selector):
    features = _features()
    plan = ItemPlan(budget=10, selector=selector, instruction=())
    rows = pruning.choose_rows(features, torch.rand(48), features[:3], plan)
    assert rows.shape == (10, 16)
    if selector not in ("visionzip", "visiondrop"):  # pure pruning: rows are input rows, in position order
        positions = [int((features == row).all(dim=1).nonzero()) for row in rows]
        assert positions == sorted(positions)


def test_merging_selector_rows_reach_the_model():
    features = _features()
    rows = pruning.choose_rows(features, torch.rand(48), features[:0], ItemPlan(12, "visionzip", ()))
    is_input_row = [(features == row).all(dim=1).any() for row in rows]
    assert not all(is_input_row), "visionzip's merged contextual rows must be returned, not input rows"


def test_layout_rows_are_not_selected_until_image_rows_run_out():
    features = _features(40)
    candidates = torch.ones(40, dtype=torch.bool)
    candidates[torch.arange(7, 40, 8)] = False  # 5 "newline" rows at 7, 15, 23, 31, 39
    newline_rows = set(range(7, 40, 8))
    for selector in ("textscythe", "uniform", "divprune"):
        rows = pruning.choose_rows(features, torch.rand(40), features[:2], ItemPlan(20, selector, ()), candidates)
        kept = {int((features == row).all(dim=1).nonzero()) for row in rows}
        assert len(kept) == 20 and not kept & newline_rows
    # 35 image rows, budget 37: all image rows + the two earliest newline rows.
    rows = pruning.choose_rows(features, None, features[:0], ItemPlan(37, "textscythe", ()), candidates)
    kept = sorted(int((features == row).all(dim=1).nonzero()) for row in rows)
    assert kept == sorted(set(range(40)) - {23, 31, 39})


def test_selection_failure_falls_back_deterministically(monkeypatch):
    features = _features()
    fallbacks = pruning.metrics.setup_worker_metrics("unit-test").fallbacks.labels("unit-test", "textscythe")
    before = fallbacks._value.get()
    monkeypatch.setenv(pruning.FAULT_INJECTION_ENV, "1")
    first = pruning.choose_rows(features, None, features[:2], ItemPlan(9, "textscythe", ()))
    second = pruning.choose_rows(features, None, features[:2], ItemPlan(9, "textscythe", ()))
    assert first.shape == (9, 16) and torch.equal(first, second)
    assert fallbacks._value.get() == before + 2
    monkeypatch.delenv(pruning.FAULT_INJECTION_ENV)
    uniform = pruning.choose_rows(features, None, features[:0], ItemPlan(9, "uniform", ()))
    assert torch.equal(first, uniform)


@pytest.mark.parametrize(("attention_rows", "layout_rows"), [(40, None), (56, None), (None, 40), (None, 56)])
def test_attention_or_layout_of_another_length_takes_the_fallback(attention_rows, layout_rows):
    features = _features()
    fallbacks = pruning.metrics.setup_worker_metrics("unit-test").fallbacks.labels("unit-test", "textscythe")
    before = fallbacks._value.get()
    attention = None if attention_rows is None else torch.rand(attention_rows)
    candidates = None if layout_rows is None else torch.ones(layout_rows, dtype=torch.bool)
    rows = pruning.choose_rows(features, attention, features[:2], ItemPlan(9, "textscythe", ()), candidates)
    assert fallbacks._value.get() == before + 1
    uniform = pruning.choose_rows(features, None, features[:0], ItemPlan(9, "uniform", ()))
    assert torch.equal(rows, uniform)  # the fallback over all rows, not over a prefix the layout covers


def test_prune_items_leaves_unpruned_items_alone():
    items = [_features(30, seed=1), _features(30, seed=2)]
    plans = [ItemPlan(0, "", ()), ItemPlan(8, "textscythe", (1, 2))]
    table = torch.randn(10, 16)
    out = pruning.prune_items(items, [None, torch.rand(30)], plans, lambda ids: table[ids])
    assert out[0] is items[0] and out[1].shape == (8, 16)


def test_decode_plans_of_unpruned_batch_is_none():
    packed = [ItemPlan(0, "", ()).encode(), ItemPlan(0, "", ()).encode()]
    assert pruning.decode_plans(packed, 2) is None
    assert pruning.decode_plans(None, 0) is None
    with pytest.raises(RuntimeError):
        pruning.decode_plans(packed, 3)


def test_anyres_layout_matches_vllm_merge(tiny_llava_next_dir):
    from transformers import AutoConfig
    from vllm.model_executor.models.llava_next import (
        LlavaNextForConditionalGeneration,
        get_anyres_image_grid_shape,
    )

    from textscythe_vllm.models.llava_next import anyres_layout

    config = AutoConfig.from_pretrained(tiny_llava_next_dir)
    dim = config.text_config.hidden_size
    newline = torch.randn(dim)
    fake = SimpleNamespace(config=config, image_newline=newline)
    for height, width in [(336, 336), (336, 672), (672, 672), (500, 300), (200, 900)]:
        rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, 336)
        views = 1 + rows * cols  # the base view + the tiles
        patches = torch.randn(views, 576, dim)
        merged = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            fake, torch.tensor([height, width]), patches, strategy="spatial_unpad"
        )
        layout = anyres_layout(config, torch.tensor([height, width]), views)
        assert layout.shape[0] == merged.shape[0]
        flat = patches.reshape(-1, dim)
        assert torch.equal(merged[layout >= 0], flat[layout[layout >= 0]])
        assert torch.equal(merged[layout < 0], newline.expand(int((layout < 0).sum()), dim))


def test_untested_vllm_version_is_refused_with_one_clear_message():
    from textscythe_vllm._vllm import UnsupportedVLLMVersion, check_vllm_version

    for admitted in ("0.32.0", "0.32.3+cpu", "0.33.0", "0.33.1", "0.33.0+cu130"):
        check_vllm_version(admitted)
    messages = set()
    for version in ("0.31.2", "0.34.0", "1.0.0", "0.3.3", "0.320.0"):
        with pytest.raises(UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.x and 0\.33\.x only") as caught:
            check_vllm_version(version)
        messages.add(str(caught.value).replace(version, "V"))
    assert len(messages) == 1  # one message, naming the installed version and the requirement
    assert "'vllm>=0.32,<0.34'" in messages.pop()


def test_profiling_inputs_stay_unpruned_under_a_server_default_budget(tiny_llava_dir, caplog):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from textscythe_dev.images import scene
    from textscythe_vllm.plugin import register

    register()
    config = ModelConfig(model=str(tiny_llava_dir), mm_processor_kwargs={"visual_token_budget": 192})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(processor).__name__ == "TextScytheLlavaMultiModalProcessor"
    dummy = processor.get_dummy_mm_inputs({"image": 1})
    assert [p.length for p in dummy["mm_placeholders"]["image"]] == [576]

    tokenizer = processor.info.get_tokenizer()
    prompt = tokenizer.encode("USER: <image>\nwhat colour is the umbrella ? ASSISTANT:")

    def placeholders(**request_kwargs):
        items = processor.info.parse_mm_data({"image": [scene(1)]})
        inputs = ProcessorInputs(prompt, items, hf_processor_mm_kwargs=request_kwargs)
        result = processor.apply(inputs, TimingContext(enabled=False))
        return [p.length for p in result["mm_placeholders"]["image"]], result["mm_hashes"]["image"][0]

    default, default_hash = placeholders()
    assert default == [192]
    override, override_hash = placeholders(visual_token_budget=32)
    assert override == [32] and override_hash != default_hash
    assert "not a valid argument" not in caplog.text


def test_processor_takes_only_the_plugins_keys_from_a_request(tiny_llava_dir, caplog):
    """Whatever frontend a request used: HF options that would kill the worker, and forged private keys, are
    dropped by the processor itself; the operator's --mm-processor-kwargs still apply."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from textscythe_dev.images import scene
    from textscythe_vllm.plugin import register

    register()

    def process(server_kwargs=None, **request_kwargs):
        processor = MULTIMODAL_REGISTRY.create_processor(
            ModelConfig(model=str(tiny_llava_dir), mm_processor_kwargs=server_kwargs)
        )
        tokenizer = processor.info.get_tokenizer()
        prompt = tokenizer.encode("USER: <image>\nwhat colour is the umbrella ? ASSISTANT:")
        items = processor.info.parse_mm_data({"image": [scene(1, 500, 500)]})
        inputs = ProcessorInputs(prompt, items, hf_processor_mm_kwargs=request_kwargs)
        result = processor.apply(inputs, TimingContext(enabled=False))
        item = result["mm_kwargs"]["image"][0]
        return (item["pixel_values"].data, [p.length for p in result["mm_placeholders"]["image"]],
                result["mm_hashes"]["image"][0])

    clean_pixels, clean_tokens, clean_hash = process()
    assert clean_pixels.shape == (3, 336, 336)
    caplog.set_level("WARNING", logger="vllm.textscythe")
    pixels, tokens, item_hash = process(
        do_resize=False, do_center_crop=False, _textscythe_plans={"image": [[1, 0]]}, _textscythe_request="forged"
    )
    assert torch.equal(pixels, clean_pixels) and tokens == clean_tokens and item_hash == clean_hash
    assert "'do_resize'" in caplog.text and "'_textscythe_plans'" in caplog.text
    assert process(visual_token_budget=16)[1] == [16]
    # the operator's options reach the HF processor (a server-wide mean shifts every pixel)
    operator_pixels = process({"image_mean": [0.0, 0.0, 0.0]})[0]
    assert not torch.allclose(operator_pixels, clean_pixels)


class _CountingFallbacks:
    def __init__(self) -> None:
        self.fallbacks: list[str] = []

    def record_selection(self, selector: str, seconds: float) -> None:
        pass

    def record_fallback(self, selector: str) -> None:
        self.fallbacks.append(selector)


def _wrong_count_selector(visual, text, attention, k):
    from textscythe_vllm.selectors import SelectionResult

    return SelectionResult(indices=torch.arange(k - 1), embeddings=visual[: k - 1])


def test_selector_returning_the_wrong_row_count_takes_the_uniform_fallback(monkeypatch):
    """The engine dies on fewer rows than placeholders: a selector that returns K - 1 rows must not get through."""
    from textscythe_vllm import metrics

    real = pruning.selector_instance
    broken = SimpleNamespace(select=_wrong_count_selector)
    monkeypatch.setattr(pruning, "selector_instance", lambda name: broken if name == "textscythe" else real(name))
    counter = _CountingFallbacks()
    monkeypatch.setattr(metrics, "_worker_metrics", counter)
    features, text = torch.randn(30, 16), torch.randn(3, 16)
    rows, positions = pruning.choose_rows_and_positions(features, torch.rand(30), text, ItemPlan(8, "textscythe", (5,)))
    expected = real("uniform").select(features, text[:0], None, 8).indices
    assert torch.equal(positions, expected) and torch.equal(rows, features[expected])
    assert counter.fallbacks == ["textscythe"]


def test_failing_fallback_keeps_the_first_k_rows(monkeypatch, caplog):
    from textscythe_vllm import metrics

    def raising(*args, **kwargs):
        raise RuntimeError("broken selector")

    monkeypatch.setattr(pruning, "selector_instance", lambda name: SimpleNamespace(select=raising))
    counter = _CountingFallbacks()
    monkeypatch.setattr(metrics, "_worker_metrics", counter)
    features = torch.randn(30, 16)
    rows, positions = pruning.choose_rows_and_positions(features, None, torch.randn(2, 16), ItemPlan(8, "divprune", ()))
    assert torch.equal(positions, torch.arange(8)) and torch.equal(rows, features[:8])
    assert counter.fallbacks == ["divprune"]
    assert "fallback selector failed; keeping the first 8 rows" in caplog.text


def test_draw_kept_patches_for_each_layout():
    from PIL import Image

    from textscythe_vllm.draw import draw_kept

    image = Image.new("RGB", (480, 336), (200, 100, 50))
    grid = {"layout": {"kind": "grid", "rows": 24, "cols": 24, "region": "centre-crop"}, "kept_positions": [0]}
    drawn = draw_kept(image, grid)
    # the centre square starts 72 px in: the first patch there is kept (bright), the margin is dimmed
    assert drawn.getpixel((72 + 7, 7)) == (200, 100, 50) and drawn.getpixel((10, 10)) != (200, 100, 50)
    whole = {"layout": {"kind": "grid", "rows": 24, "cols": 24, "region": "whole"}, "kept_positions": [0]}
    assert draw_kept(image, whole).getpixel((5, 5)) == (200, 100, 50)
    views = {"layout": {"kind": "views", "views": 2, "view_rows": 24, "view_cols": 24,
                        "row_to_patch": [-1, 0, 600]}, "kept_positions": [1, 2]}
    assert draw_kept(image, views).getpixel((5, 5)) == (200, 100, 50)  # base-view patch 0 over the whole picture
    with pytest.raises(ValueError, match="cannot draw"):
        draw_kept(image, {"layout": {"kind": "grid", "rows": 2, "cols": 2, "frames": 4}, "kept_positions": [1]})
