"""Unit tests of the Qwen2.5-VL glue: position channels, the M-RoPE layout of pruned prompts, the attention probe's
arithmetic, and the processor (placeholders, plans, hashes) -- no engine is started."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from textscythe_dev.images import scene
from textscythe_dev.tiny_qwen import tiny_video
from textscythe_vllm import probes
from textscythe_vllm.models import mrope
from textscythe_vllm.models import qwen2_5_vl as qwen
from textscythe_vllm.probes import RotaryAttentionProbe
from textscythe_vllm.processing import ItemPlan, plan_field
from textscythe_vllm.request import PruningRequestError


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from textscythe_dev.tiny_qwen import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


# -- position channels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_position_channels_are_exact_in_every_dtype(dtype):
    offsets = torch.tensor([[0, 1, 255, 256, 65535, 70000, (1 << 24) - 1], [0, 3, 7, 9, 11, 13, 0],
                            [5, 0, 300, 4095, 2, 1, 1]])
    channels = mrope.encode_positions(offsets, dtype)
    assert channels.dtype == dtype and channels.shape == (offsets.shape[1], mrope.POSITION_CHANNELS)
    assert torch.equal(mrope.decode_positions(channels), offsets)
    with pytest.raises(ValueError):
        mrope.encode_positions(torch.tensor([[1 << 24], [0], [0]]), dtype)


def test_split_position_channels_maps_rows_to_their_tokens():
    width = 4
    plain = torch.randn(3, width)
    offsets = torch.tensor([[0, 2], [1, 0], [3, 5]])
    pruned = torch.cat([torch.randn(2, width), mrope.encode_positions(offsets, torch.float32)], dim=1)
    is_multimodal = torch.tensor([False, True, True, True, False, False, True, True, False])
    cleaned, pending = mrope.split_position_channels([plain, pruned], width, is_multimodal)
    assert torch.equal(cleaned[0], plain) and torch.equal(cleaned[1], pruned[:, :width])
    token_index, got = pending
    assert token_index.tolist() == [6, 7] and torch.equal(got, offsets)
    assert mrope.split_position_channels([plain], width, is_multimodal) == ([plain], None)
    with pytest.raises(RuntimeError, match="rows for"):
        mrope.split_position_channels([plain, pruned], width, is_multimodal[:5])


# -- M-RoPE layout -------------------------------------------------------------------------------------------


def _feature(modality, offset, length, grid, seconds=None):
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    if seconds is not None:
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
    return SimpleNamespace(modality=modality, mm_position=SimpleNamespace(offset=offset, length=length), data=data)


def _bare_model(config):
    model = object.__new__(qwen.TextScytheQwen2_5_VLForConditionalGeneration)  # no weights, no engine
    model.config, model._evs, model._pending_positions = config, False, None
    return model


@pytest.fixture(scope="module")
def bare_model(tiny_qwen_dir):
    from transformers import AutoConfig

    return _bare_model(AutoConfig.from_pretrained(tiny_qwen_dir))


def _layout(prompt_items, text_lengths):
    """Token ids and features of a prompt: text, item, text, item, ..., text. ``prompt_items``: (modality, t, h,
    w (patches), kept count or None, seconds)."""
    tokens, features, offset = [], [], 0
    pad = {"image": 6, "video": 7}
    for text, (modality, t, h, w, kept, seconds) in zip(text_lengths, prompt_items, strict=False):
        tokens += [100] * text
        offset += text
        count = t * h * w // 4 if kept is None else kept
        features.append(_feature(modality, offset, count, [t, h, w], seconds))
        tokens += [pad[modality]] * count
        offset += count
    tokens += [100] * text_lengths[-1]
    return tokens, features


def test_layout_of_unpruned_prompts_is_stock(bare_model):
    items = [("video", 4, 8, 12, None, 1.0), ("image", 1, 16, 24, None, None)]
    tokens, features = _layout(items, [5, 3, 7])
    ours = bare_model.get_mrope_input_positions(tokens, features)
    stock = qwen.Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(bare_model, tokens, features)
    assert torch.equal(ours[0], stock[0]) and ours[1] == stock[1]


@pytest.mark.parametrize("seconds", [1.0, 0.5, 2.0 / 3.0])
def test_pruned_layout_keeps_original_positions(bare_model, seconds):
    """Text and unpruned items keep the positions of the unpruned prompt; a pruned item's placeholders all carry
    its base, and base + each kept row's own offset (what forward() adds) is that row's unpruned position."""
    full_items = [
        ("video", 4, 8, 12, None, seconds), ("image", 1, 16, 24, None, None), ("image", 1, 24, 16, None, None),
    ]
    kept = {0: torch.tensor([0, 5, 30, 77, 95]), 2: torch.tensor([3, 17, 60])}
    pruned_items = [
        (m, t, h, w, len(kept[i]) if i in kept else None, s) for i, (m, t, h, w, _, s) in enumerate(full_items)
    ]
    texts = [5, 3, 4, 7]
    full_tokens, full_features = _layout(full_items, texts)
    tokens, features = _layout(pruned_items, texts)
    full, full_delta = qwen.Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(
        bare_model, full_tokens, full_features
    )
    ours, delta = bare_model.get_mrope_input_positions(tokens, features)
    assert ours.shape == (3, len(tokens)) and ours.dtype == torch.int64
    # generation continues where the unpruned prompt would: same next position
    assert delta + len(tokens) == full_delta + len(full_tokens)
    # walk both prompts item by item
    for index, ((_, t, h, w, _, s), full_feature) in enumerate(zip(full_items, full_features, strict=True)):
        start = full_feature.mm_position.offset
        cells = full[:, start:start + t * h * w // 4]
        t_factor = 1.0 if s is None else s * bare_model.config.vision_config.tokens_per_second
        grid = qwen.grid_positions(t, h // 2, w // 2, t_factor)
        assert torch.equal(cells - cells[:, :1], torch.from_numpy(grid))  # stock cells = base + grid offsets
        if index in kept:
            relative = torch.from_numpy(grid)[:, kept[index]]
            pruned_base = ours[:, features[index].mm_position.offset:][:, :len(kept[index])]
            assert torch.equal(pruned_base, cells[:, :1].expand_as(pruned_base))
            fixed = bare_model._apply_offsets(pruned_base, torch.arange(len(kept[index])), relative)
            assert torch.equal(fixed, cells[:, kept[index]])
    # text positions: every non-placeholder token keeps its unpruned position
    text_full = full[:, [i for i, tok in enumerate(full_tokens) if tok == 100]]
    text_ours = ours[:, [i for i, tok in enumerate(tokens) if tok == 100]]
    assert torch.equal(text_full, text_ours)


def test_apply_offsets_refuses_positions_it_did_not_lay_out(bare_model, caplog):
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 3], [0, 1, 2, 3]])
    same = bare_model._apply_offsets(positions, torch.tensor([2]), torch.tensor([[1], [1], [1]]))
    assert same is positions and "keep their item's base position" in caplog.text


def test_forward_applies_pending_offsets_once(bare_model, monkeypatch):
    seen = []
    monkeypatch.setattr(qwen.Qwen2_5_VLForConditionalGeneration, "forward",
                        lambda self, input_ids, positions, *args, **kwargs: seen.append(positions.clone()))
    positions = torch.tensor([[0, 1, 1, 1, 9], [0, 1, 1, 1, 9], [0, 1, 1, 1, 9]])
    bare_model._pending_positions = (torch.tensor([1, 3]), torch.tensor([[0, 2], [1, 3], [4, 0]]))
    bare_model.forward(None, positions)
    bare_model.forward(None, positions)
    assert seen[0].tolist() == [[0, 1, 1, 3, 9], [0, 2, 1, 4, 9], [0, 5, 1, 1, 9]]
    assert torch.equal(seen[1], positions)  # consumed by the first forward
    assert positions[0, 3] == 1  # the runner's buffer is not written


# -- attention probe -----------------------------------------------------------------------------------------


def _probe_for(grid_thw, heads=2, head_dim=8, window_size=112):
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    visual = SimpleNamespace(window_size=window_size, patch_size=14, spatial_merge_size=2, spatial_merge_unit=4)
    visual.get_window_index_thw = lambda t, h, w: Qwen2_5_VisionTransformer.get_window_index_thw(visual, t, h, w)
    probe = RotaryAttentionProbe(torch.nn.Identity(), local_heads=heads, head_dim=head_dim, tp_size=1)
    probe._segments = [h * w for t, h, w in grid_thw for _ in range(t)]
    return probe, visual


@pytest.mark.parametrize("block_elements", [1 << 24, 97])  # one block per sequence, or many small query chunks
def test_probe_equals_dense_attention_in_raster_order(monkeypatch, block_elements):
    monkeypatch.setattr(probes, "PROBE_BLOCK_ELEMENTS", block_elements)
    grid_thw = [[1, 8, 12], [2, 4, 6]]  # an image (windows of 4x4 merged rows) and a 2-step video
    probe, visual = _probe_for(grid_thw)
    generator = torch.Generator().manual_seed(0)
    # per item, raster-order patches (in 2x2 merge units, as the processor emits them) and their queries/keys
    raster_q, raster_k, expected = [], [], []
    for t, h, w in grid_thw:
        q = torch.randn(t * h * w, 2, 8, generator=generator) * 3
        k = torch.randn(t * h * w, 2, 8, generator=generator) * 3
        raster_q.append(q)
        raster_k.append(k)
        received = []
        for frame in range(t):  # dense softmax per full-attention sequence, mean over heads and queries
            rows = slice(frame * h * w, (frame + 1) * h * w)
            weights = torch.softmax(torch.einsum("ihd,jhd->hij", q[rows], k[rows]) * 8**-0.5, dim=-1)
            received.append(weights.mean(dim=(0, 1)))
        expected.append(torch.cat(received).reshape(-1, 4).mean(dim=1))
    # the tower's window order: merged units permuted per item by vLLM's own window index
    window_q, window_k = [], []
    for (t, h, w), q, k in zip(grid_thw, raster_q, raster_k, strict=True):
        index, _ = visual.get_window_index_thw(t, h, w)
        window_q.append(q.reshape(-1, 4, 2, 8)[index].reshape(-1, 2, 8))
        window_k.append(k.reshape(-1, 4, 2, 8)[index].reshape(-1, 2, 8))
    patches = probe.scores(torch.stack([torch.cat(window_q), torch.cat(window_k)]))
    got = qwen.merged_row_attention(visual, patches, grid_thw)
    for item, want in zip(got, expected, strict=True):
        torch.testing.assert_close(item, want, atol=1e-7, rtol=1e-5)


# -- processor -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tiny_qwen_dir):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from textscythe_vllm.plugin import register

    register()
    config = ModelConfig(model=str(tiny_qwen_dir), limit_mm_per_prompt={"image": 2, "video": 2})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(processor).__name__ == "TextScytheQwen2_5_VLMultiModalProcessor"
    return processor


PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what is the dog doing ?<|im_end|>\n"
    "<|im_start|>assistant\nit is running<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and the car ?<|im_end|>\n<|im_start|>assistant\n"
)


def _apply(processor, prompt=PROMPT, **request_kwargs):
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    tokens = processor.info.get_tokenizer().encode(prompt)
    items = processor.info.parse_mm_data({"image": [scene(1, 336, 224)], "video": [tiny_video(2)]})
    return processor.apply(ProcessorInputs(tokens, items, hf_processor_mm_kwargs=request_kwargs),
                           TimingContext(enabled=False))


def test_processor_gives_each_item_min_budget_placeholders_and_a_plan(processor):
    tokenizer = processor.info.get_tokenizer()
    full = _apply(processor)
    assert [p.length for p in full["mm_placeholders"]["image"]] == [96]
    assert [p.length for p in full["mm_placeholders"]["video"]] == [96]
    for budget, kept in ((10, 10), (96, 96), (500, 96)):
        result = _apply(processor, visual_token_budget=budget, visual_token_selector="cls_attention")
        assert [p.length for p in result["mm_placeholders"]["image"]] == [kept]
        assert [p.length for p in result["mm_placeholders"]["video"]] == [kept]
        assert len(result["prompt_token_ids"]) == len(full["prompt_token_ids"]) - 2 * (96 - kept)
        # vision start/end stay around the kept placeholders
        ids = result["prompt_token_ids"]
        start = result["mm_placeholders"]["video"][0].offset
        assert ids[start - 1] == 4 and ids[start + kept] == 5
        plans = {m: ItemPlan.decode(result["mm_kwargs"][m][0][plan_field(m)].data) for m in ("image", "video")}
        assert {plan.budget for plan in plans.values()} == {budget}
        assert {plan.selector for plan in plans.values()} == {"cls_attention"}
        words = tokenizer.convert_ids_to_tokens
        # instruction: the words of the user message holding the item (no role words, no earlier turns)
        assert words(list(plans["video"].instruction)) == ["what", "is", "the", "dog", "doing", "?"]
        assert words(list(plans["image"].instruction)) == ["and", "the", "car", "?"]


def test_metrics_count_unpruned_tokens_per_item(processor):
    items = processor.info.parse_mm_data({"image": [scene(1, 336, 224)], "video": [tiny_video(2)]})
    assert processor._unpruned_token_count(items["image"], 0, "image") == 96
    assert processor._unpruned_token_count(items["video"], 0, "video") == 96


def test_processor_hashes_and_no_budget_path(processor):
    full = _apply(processor)
    assert full["mm_hashes"] == _apply(processor)["mm_hashes"]
    pruned = _apply(processor, visual_token_budget=10)
    other_budget = _apply(processor, visual_token_budget=11)
    other_question = _apply(processor, PROMPT.replace("the car", "the dog"), visual_token_budget=10)
    for modality in ("image", "video"):
        assert pruned["mm_hashes"][modality] != full["mm_hashes"][modality]
        assert pruned["mm_hashes"][modality] != other_budget["mm_hashes"][modality]
    # the video's turn is before the changed question: same selection, same hash; the image's turn changed
    assert other_question["mm_hashes"]["video"] == pruned["mm_hashes"]["video"]
    assert other_question["mm_hashes"]["image"] != pruned["mm_hashes"]["image"]
    # without a budget every item carries an unpruned plan and stock placeholders
    assert ItemPlan.decode(full["mm_kwargs"]["video"][0][plan_field("video")].data).budget == 0


def test_bad_budget_and_evs_are_refused(processor, monkeypatch):
    with pytest.raises(PruningRequestError) as caught:
        _apply(processor, visual_token_budget=0)
    assert caught.value.param == "visual_token_budget"
    monkeypatch.setattr(processor.info.ctx.get_mm_config(), "video_pruning_rate", 0.5)
    with pytest.raises(PruningRequestError, match=r"video-pruning-rate"):
        _apply(processor, visual_token_budget=10)


def test_grid_positions_match_numpy_stock_formula():
    grid = qwen.grid_positions(3, 2, 4, 2.0 / 3.0)
    assert grid.shape == (3, 24)
    assert np.array_equal(grid[0], (np.repeat(np.arange(3), 8) * (2.0 / 3.0)).astype(np.int64))
    assert np.array_equal(grid[1], np.tile(np.repeat(np.arange(2), 4), 3))
    assert np.array_equal(grid[2], np.tile(np.arange(4), 6))
