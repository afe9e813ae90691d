"""LLaVA-OneVision glue, in process: the SigLIP mean-attention probe against a dense computation, and the
attention/newline layout of images (any-resolution tiles, ``anyres_max_9`` down-sampling) and videos (pooled
frames) against vLLM's own merge of real-shaped features and the HF processor's token counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from textscythe_dev import tiny_onevision
from textscythe_dev.images import scene
from textscythe_vllm import probes
from textscythe_vllm.models import llava_onevision as onevision


class _FakeSiglipAttention(torch.nn.Module):
    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.qkv_proj = torch.nn.Identity()
        self.num_heads = self.num_heads_per_partition = heads
        self.head_dim, self.scale, self.tp_size = head_dim, head_dim**-0.5, 1


def _dense_mean_received(qkv: Tensor, heads: int, head_dim: int) -> Tensor:
    batch, length = qkv.shape[:2]
    query, key, _ = qkv.double().chunk(3, dim=-1)
    query = query.reshape(batch, length, heads, head_dim).transpose(1, 2)  # [B, h, S, d]
    key = key.reshape(batch, length, heads, head_dim).transpose(1, 2)
    weights = torch.softmax(query @ key.transpose(-1, -2) * head_dim**-0.5, dim=-1)  # [B, h, S(query), S(key)]
    return weights.mean(dim=2).mean(dim=1)  # [B, S]: mean over queries, then heads


@pytest.mark.parametrize("block_elements", [1 << 24, 1000])  # one block per view, or many query chunks
def test_mean_attention_probe_equals_dense(monkeypatch, block_elements):
    monkeypatch.setattr(probes, "PROBE_BLOCK_ELEMENTS", block_elements)
    heads, head_dim, batch, length = 2, 32, 3, 729
    generator = torch.Generator().manual_seed(0)
    qkv = 3 * torch.randn(batch, length, 3 * heads * head_dim, generator=generator)
    probe = probes.MeanAttentionProbe(_FakeSiglipAttention(heads, head_dim))
    scores = probe.scores(qkv)
    expected = _dense_mean_received(qkv, heads, head_dim)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(batch))
    assert scores.std() > 0.1 * scores.mean()  # not uniform: the comparison can tell tokens apart


def test_probe_is_captured_from_the_qkv_hook():
    probe = probes.MeanAttentionProbe(_FakeSiglipAttention(2, 32))
    qkv = torch.randn(2, 50, 192, generator=torch.Generator().manual_seed(1))
    probe._attention.qkv_proj(qkv)  # outside capture(): ignored
    with probe.capture() as captured:
        probe._attention.qkv_proj(qkv)
    assert len(captured) == 1 and torch.equal(captured[0], probe.scores(qkv)) and probe.seconds > 0


@pytest.fixture(scope="module")
def hf_processor():
    tokenizer = tiny_onevision.build_tokenizer()
    return tiny_onevision.build_processor(tokenizer)


@pytest.fixture(scope="module")
def model_like():
    config = tiny_onevision.build_config(len(tiny_onevision.vocabulary()))
    newline = torch.full((8,), 7.0)  # features never take this exact value
    return SimpleNamespace(config=config, image_newline=torch.nn.Parameter(newline))


@pytest.mark.parametrize("size", [(384, 384), (336, 336), (800, 400), (400, 1200), (1600, 1200), (2304, 500)])
def test_image_layout_matches_vllm_merge_and_hf_token_count(hf_processor, model_like, size):
    width, height = size
    processed = hf_processor(text="<image>", images=[scene(5, width, height)], return_tensors="pt")
    expected_tokens = int((processed["input_ids"] == tiny_onevision.vocabulary()["<image>"]).sum())
    views = processed["pixel_values"].shape[1]
    image_size = processed["image_sizes"][0]
    generator = torch.Generator().manual_seed(width * height)
    attention = torch.rand(views, tiny_onevision.TOKENS_PER_VIEW, generator=generator)
    features = torch.randn(views, tiny_onevision.TOKENS_PER_VIEW, 8, generator=generator)
    features[..., 0] = attention  # channel 0 carries the attention through vLLM's own merge
    merged = onevision.LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        model_like, image_size, features, image_newline=model_like.image_newline, strategy="spatial_unpad"
    )
    scores, is_content = onevision.image_layout(model_like, image_size, attention)
    assert scores.shape[0] == is_content.shape[0] == merged.shape[0] == expected_tokens
    newline_rows = (merged == 7.0).all(dim=1)
    assert torch.equal(is_content, ~newline_rows)
    torch.testing.assert_close(scores[is_content], merged[is_content, 0], rtol=1e-6, atol=1e-7)
    assert torch.all(scores[~is_content] == 0)
    # the base view comes first and is not interpolated: its rows keep their own attention, in order
    assert torch.equal(scores[: tiny_onevision.TOKENS_PER_VIEW], attention[0])
    if views > 1:  # one newline per tile row, closing it
        assert bool(newline_rows[-1]) and int(newline_rows.sum()) >= 1


def test_large_images_are_downsampled_and_keep_the_token_count(hf_processor, model_like):
    # 1600 x 1200 picks a grid beyond 9 views' worth: vLLM interpolates the tiles (anyres_max_9)
    processed = hf_processor(text="<image>", images=[scene(6, 1600, 1200)], return_tensors="pt")
    views = processed["pixel_values"].shape[1]
    assert views - 1 > 9
    _, is_content = onevision.image_layout(model_like, processed["image_sizes"][0],
                                           torch.rand(views, tiny_onevision.TOKENS_PER_VIEW))
    tile_rows = int((~is_content).sum())
    tile_width = int(is_content[tiny_onevision.TOKENS_PER_VIEW:].sum()) // tile_rows
    assert tile_rows * tile_width <= 9 * tiny_onevision.TOKENS_PER_VIEW * 1.1**2  # capped by anyres_max_9


def test_video_layout_matches_vllm_pooling(hf_processor, model_like):
    import numpy as np

    frames = np.stack([np.asarray(scene(9 + index, 400, 300)) for index in range(3)])
    processed = hf_processor(text="<video>", videos=[frames], return_tensors="pt")
    expected_tokens = int((processed["input_ids"] == tiny_onevision.vocabulary()["<video>"]).sum())
    attention = torch.rand(3, tiny_onevision.TOKENS_PER_VIEW, generator=torch.Generator().manual_seed(3))
    scores, is_content = onevision.video_layout(model_like, attention)
    assert scores.shape[0] == expected_tokens == 3 * tiny_onevision.TOKENS_PER_FRAME + 1
    assert is_content.tolist() == [True] * (expected_tokens - 1) + [False]
    pooled = onevision.LlavaOnevisionForConditionalGeneration.apply_pooling(
        model_like, attention.unsqueeze(-1).repeat(1, 1, 4)
    )  # [F, P, 4]: the features' pooling on 4 channels that all carry the attention
    torch.testing.assert_close(scores[:-1], pooled[..., 2].reshape(-1))
    # a frame's pooled rows stay within that frame's block, in frame order
    assert torch.equal(scores[: tiny_onevision.TOKENS_PER_FRAME],
                       onevision.video_layout(model_like, attention[:1])[0][:-1])
