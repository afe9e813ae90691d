"""InternVL glue, in process, for both formats vLLM serves: the InternViT [CLS] probe against a dense eager
computation, the pixel-shuffle layout of attention against vLLM's own ``pixel_shuffle`` on features (``ps_version``
v1 and v2, and the HF format's), the per-item / per-frame split in ``encode_items``, and the processors' token
counts under budgets (tiles + thumbnail under one budget; a video's budget spread over its frames)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor

from textscythe_dev import tiny_internvl
from textscythe_dev.images import scene
from textscythe_vllm import probes
from textscythe_vllm.models import internvl
from textscythe_vllm.processing import ItemPlan, plan_field, spread_budget

SIDE = tiny_internvl.PATCHES_PER_SIDE  # 8 patches per tile side
TOKENS = tiny_internvl.TOKENS_PER_TILE  # 16 tokens per tile


class _FakeEncoderAttention(torch.nn.Module):
    """Stands in for vLLM's MMEncoderAttention: the probe reads its (q, k) inputs."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return value


def _dense_cls_attention(query: Tensor, key: Tensor, heads: int, head_dim: int) -> Tensor:
    """``[B, S]``: eager softmax attention of the [CLS] query (row 0), averaged over the heads."""
    batch, length = query.shape[:2]
    q = query.double().reshape(batch, length, -1, head_dim)[:, :, :heads].transpose(1, 2)  # [B, h, S, d]
    k = key.double().reshape(batch, length, -1, head_dim)[:, :, :heads].transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)  # [B, h, S, S]
    return weights[:, :, 0].mean(dim=1)


@pytest.mark.parametrize("dummy_heads", [0, 2])
def test_cls_probe_equals_dense_attention(dummy_heads):
    heads, head_dim, batch, length = 2, 32, 3, 1 + SIDE * SIDE
    generator = torch.Generator().manual_seed(dummy_heads)
    width = (heads + dummy_heads) * head_dim
    query, key = (3 * torch.randn(batch, length, width, generator=generator) for _ in range(2))
    if dummy_heads:  # padding heads have zero weights: zero queries and keys (uniform attention if counted)
        query[..., heads * head_dim:] = 0
        key[..., heads * head_dim:] = 0
    module = _FakeEncoderAttention()
    probe = probes.InternClsAttentionProbe(module, local_heads=heads + dummy_heads, head_dim=head_dim,
                                           total_heads=heads)
    module(query, key, query)  # outside capture(): ignored
    with probe.capture() as captured:
        module(query, key, torch.zeros_like(query))
    assert len(captured) == 1 and probe.seconds > 0
    expected = _dense_cls_attention(query, key, heads, head_dim)
    torch.testing.assert_close(captured[0].double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(captured[0].sum(dim=1), torch.ones(batch))
    assert expected.std() > 0.1 * expected.mean()  # not uniform: the comparison can tell patches apart


def _vllm_pixel_shuffles() -> dict[str, object]:
    from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration
    from vllm.model_executor.models.internvl import InternVLChatModel

    return {
        "chat-v1": InternVLChatModel.pixel_shuffle.__get__(SimpleNamespace(ps_version="v1")),
        "chat-v2": InternVLChatModel.pixel_shuffle.__get__(SimpleNamespace(ps_version="v2")),
        "hf": InternS1ForConditionalGeneration.pixel_shuffle.__get__(SimpleNamespace()),
    }


@pytest.mark.parametrize("version", ["chat-v1", "chat-v2", "hf"])
def test_attention_layout_follows_vllm_pixel_shuffle_of_features(version):
    shuffle = _vllm_pixel_shuffles()[version]
    index_map = internvl.shuffle_index_map(shuffle, SIDE, 0.5)
    assert index_map.shape == (TOKENS, 4)
    assert sorted(index_map.reshape(-1).tolist()) == list(range(SIDE * SIDE))  # every patch in one token
    # vLLM's pixel_shuffle on real-shaped features (3 tiles, 5 channels): token t's channels are its patches'
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(3, SIDE, SIDE, 5, generator=generator)
    shuffled = shuffle(features, scale_factor=0.5).reshape(3, TOKENS, 4 * 5)  # as extract_feature flattens it
    flat = features.reshape(3, SIDE * SIDE, 5)
    for token in range(TOKENS):
        torch.testing.assert_close(shuffled[:, token], flat[:, index_map[token]].reshape(3, -1), rtol=0, atol=0)
    # attention: each token's score is the mean of its 4 patches' scores, written out by hand
    patch_scores = torch.rand(3, SIDE * SIDE, generator=generator)
    grid = patch_scores.reshape(3, SIDE, SIDE)
    by_hand = torch.empty(3, TOKENS)
    for r2 in range(SIDE // 2):
        for c2 in range(SIDE // 2):
            # v2 (and the HF format): row-major tokens; v1: column-major
            token = c2 * (SIDE // 2) + r2 if version == "chat-v1" else r2 * (SIDE // 2) + c2
            by_hand[:, token] = grid[:, 2 * r2:2 * r2 + 2, 2 * c2:2 * c2 + 2].reshape(3, 4).mean(dim=1)
    torch.testing.assert_close(internvl.token_attention(patch_scores, index_map), by_hand)


class _FakeInternVL(internvl._InternVLPruning):
    """The shared model glue on a fake tower: the "tower" runs the probe's module once over all tiles."""

    num_image_token, patch_tokens, downsample_ratio = TOKENS, SIDE * SIDE, 0.5

    def __init__(self, heads: int = 2, head_dim: int = 8) -> None:
        self.heads, self.head_dim = heads, head_dim
        self.tower_attention = _FakeEncoderAttention()
        self.cls_attention = probes.InternClsAttentionProbe(self.tower_attention, local_heads=heads,
                                                            head_dim=head_dim, total_heads=heads)
        self.pixel_shuffle = _vllm_pixel_shuffles()["chat-v2"]
        self.qk: Tensor | None = None

    def stock_features(self, modality, modality_input):
        tiles = modality_input["pixel_values_flat"].shape[0]
        qk = torch.randn(tiles, 1 + SIDE * SIDE, self.heads * self.head_dim, generator=torch.Generator().manual_seed(5))
        self.qk = qk
        self.tower_attention(qk, qk.flip(1), qk)
        rows = torch.arange(tiles * TOKENS, dtype=torch.float32)[:, None].repeat(1, 4)
        return list(rows.split([int(n) * TOKENS for n in modality_input["num_patches"]]))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_encode_items_lays_attention_out_per_item_and_frames_as_segments(modality):
    model = _FakeInternVL()
    tiles = [3, 1, 4]
    parsed = {"type": "pixel_values" if modality == "image" else "pixel_values_videos",
              "pixel_values_flat": torch.zeros(sum(tiles), 3, 4, 4), "num_patches": torch.tensor(tiles)}
    assert model.count_items(modality, parsed) == 3
    encoded = model.encode_items(modality, parsed, with_attention=True, with_layouts=True)
    assert [item.shape[0] for item in encoded.features] == [count * TOKENS for count in tiles]
    dense = _dense_cls_attention(model.qk, model.qk.flip(1), model.heads, model.head_dim)[:, 1:]  # [tiles, 64]
    expected = internvl.token_attention(dense, internvl.shuffle_index_map(model.pixel_shuffle, SIDE, 0.5))
    for item, start, count in zip(encoded.attention, np.cumsum([0, *tiles[:-1]]), tiles, strict=True):
        torch.testing.assert_close(item.double(), expected[start:start + count].reshape(-1), rtol=1e-5, atol=1e-9)
    assert encoded.segments == ([[TOKENS] * count for count in tiles] if modality == "video" else None)
    assert len(encoded.layouts) == 3
    without = model.encode_items(modality, parsed, with_attention=False, with_layouts=False)
    assert without.attention == [None] * 3 and without.layouts is None


# -- processors ----------------------------------------------------------------------------------------------

IMAGE_SIZE = (224, 112)  # 2 x 1 tiles + the thumbnail: 48 tokens
IMAGE_TOKENS = 3 * TOKENS
FRAMES = 4
VIDEO_TOKENS = FRAMES * TOKENS
PLACEHOLDERS = {"hf": ("<IMG_CONTEXT>", "<video>"), "chat": ("<image>", "<video>")}


@pytest.fixture(scope="module", params=tiny_internvl.FORMATS)
def processor(request, tmp_path_factory):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from textscythe_vllm.plugin import register

    register()
    path = tiny_internvl.build_tiny_internvl(tmp_path_factory.mktemp(f"tiny-internvl-{request.param}"),
                                            fmt=request.param)
    config = ModelConfig(model=str(path), limit_mm_per_prompt={"image": 2, "video": 1},
                         trust_remote_code=request.param == "chat")
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    expected = "TextScytheInternVLChat" if request.param == "chat" else "TextScytheInternVL"
    assert type(processor).__name__ == f"{expected}MultiModalProcessor"
    processor.fmt = request.param
    return processor


def _video() -> np.ndarray:
    return np.stack([np.asarray(scene(40 + index, 112, 112)) for index in range(FRAMES)])


def _apply(processor, **request_kwargs):
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    image, video = PLACEHOLDERS[processor.fmt]
    prompt = (f"<|im_start|>user\n{image}{video}what is the dog doing ?<|im_end|>\n<|im_start|>assistant\nit runs"
              f"<|im_end|>\n<|im_start|>user\n{image}and the car ?<|im_end|>\n<|im_start|>assistant\n")
    tokens = processor.info.get_tokenizer().encode(prompt)
    items = processor.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE), scene(2, 112, 112)], "video": [_video()]})
    return processor.apply(ProcessorInputs(tokens, items, hf_processor_mm_kwargs=request_kwargs),
                           TimingContext(enabled=False))


def _runs(result, modality: str, index: int = 0) -> tuple[list[int], list[int]]:
    """``(lengths of the item's placeholder runs, the item's other tokens)`` in its prompt range."""
    placeholder = result["mm_placeholders"][modality][index]
    ids = result["prompt_token_ids"][placeholder.offset:placeholder.offset + placeholder.length]
    is_embed = [True] * len(ids) if placeholder.is_embed is None else placeholder.is_embed.tolist()
    runs, previous = [], False
    for embed in is_embed:
        if embed:
            runs[-1:] = [runs[-1] + 1] if previous else [*runs[-1:], 1]
        previous = embed
    return runs, [token for token, embed in zip(ids, is_embed, strict=True) if not embed]


def test_hf_processor_agrees_on_the_unpruned_counts():
    """The counts below are transformers' (independent of vLLM), for the tiling both formats configure."""
    hf = tiny_internvl.build_processor(tiny_internvl.build_tokenizer())
    ids = hf(text="<IMG_CONTEXT>", images=[scene(1, *IMAGE_SIZE)], return_tensors="pt")["input_ids"]
    assert int((ids == tiny_internvl.vocabulary()["<IMG_CONTEXT>"]).sum()) == IMAGE_TOKENS


def test_processor_gives_each_item_min_budget_placeholders(processor):
    full = _apply(processor)
    assert [p.get_num_embeds() for p in full["mm_placeholders"]["image"]] == [IMAGE_TOKENS, TOKENS]
    full_runs, full_text = _runs(full, "video")
    assert full_runs == [TOKENS] * FRAMES
    for budget in (1, 5, 30, 47, 48, 64, 1000):
        result = _apply(processor, visual_token_budget=budget, visual_token_selector="cls_attention")
        images = [p.get_num_embeds() for p in result["mm_placeholders"]["image"]]
        assert images == [min(budget, IMAGE_TOKENS), min(budget, TOKENS)]  # tiles + thumbnail: one budget
        runs, text = _runs(result, "video")
        assert runs == [quota for quota in spread_budget(budget, [TOKENS] * FRAMES) if quota]
        assert text == full_text  # "Frame{i}: <img>" ... "</img>" stay
        removed = (IMAGE_TOKENS - images[0]) + (TOKENS - images[1]) + (VIDEO_TOKENS - sum(runs))
        assert len(result["prompt_token_ids"]) == len(full["prompt_token_ids"]) - removed
        plans = [ItemPlan.decode(item[plan_field("image")].data) for item in result["mm_kwargs"]["image"]]
        plans.append(ItemPlan.decode(result["mm_kwargs"]["video"][0][plan_field("video")].data))
        assert {(plan.budget, plan.selector) for plan in plans} == {(budget, "cls_attention")}
        words = processor.info.get_tokenizer().convert_ids_to_tokens
        assert words(list(plans[0].instruction)) == ["what", "is", "the", "dog", "doing", "?"]
        assert words(list(plans[1].instruction)) == ["and", "the", "car", "?"]
    # the quotas by hand: 5 over 4 frames of 16 -> 2, 1, 1, 1; 30 -> 8, 8, 7, 7
    assert _runs(_apply(processor, visual_token_budget=5), "video")[0] == [2, 1, 1, 1]
    assert _runs(_apply(processor, visual_token_budget=30), "video")[0] == [8, 8, 7, 7]


def test_metrics_count_unpruned_tokens_per_item(processor):
    items = processor.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE)], "video": [_video()]})
    assert processor._unpruned_token_count(items["image"], 0, "image") == IMAGE_TOKENS
    assert processor._unpruned_token_count(items["video"], 0, "video") == VIDEO_TOKENS


def test_no_budget_is_stock_placeholders(processor):
    full = _apply(processor)
    assert ItemPlan.decode(full["mm_kwargs"]["video"][0][plan_field("video")].data).budget == 0
    assert _apply(processor)["mm_hashes"] == full["mm_hashes"]
    assert _apply(processor, visual_token_budget=10)["mm_hashes"]["image"] != full["mm_hashes"]["image"]
