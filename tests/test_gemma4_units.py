"""Gemma 4 glue without a server: the attention probe against transformers' eager attention weights, the layout
of patch attention over soft tokens against transformers' own pooler, the matching of scored encoder rows to
items, and the processor's placeholder counts with budgets (images, video frames with per-frame quotas, a
server-wide ``max_soft_tokens``)."""

from __future__ import annotations

import pytest
import torch

from textscythe_dev import tiny_gemma4
from textscythe_dev.images import scene
from textscythe_dev.tiny_gemma4 import tiny_video
from textscythe_vllm import probes
from textscythe_vllm.models import gemma4
from textscythe_vllm.probes import NormedRotaryAttentionProbe
from textscythe_vllm.processing import ItemPlan, plan_field, spread_budget

IMAGE_SIZE = (480, 336)  # -> 30 x 21 patches -> 10 x 7 = 70 soft tokens (the tiny checkpoint's budget)
FRAME_TOKENS = 63  # a 336 x 240 frame at 70 soft tokens: resized to 432 x 336 px -> 9 x 7 soft tokens
NUM_FRAMES = 4


def vision_model(num_key_value_heads: int):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    config = tiny_gemma4.build_config(len(tiny_gemma4.vocabulary())).vision_config
    config.num_key_value_heads = num_key_value_heads
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Gemma4VisionModel(config).eval()
    with torch.no_grad():  # far from uniform attention (Gemma 4 normalises q and k: scale the norms)
        for layer in model.encoder.layers:
            layer.self_attn.q_norm.weight.mul_(4.0)
            layer.self_attn.k_norm.weight.mul_(4.0)
    return model


def grid_positions(cols: int, rows: int, total: int) -> torch.Tensor:
    """``[total, 2]`` (x, y) of a ``rows x cols`` patch grid in raster order, then ``(-1, -1)`` padding."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    grid = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
    return torch.cat([grid, grid.new_full((total - grid.shape[0], 2), -1)])


@pytest.mark.parametrize("num_key_value_heads", [2, 1])  # plain and grouped-query attention
@pytest.mark.parametrize("block_elements", [1 << 24, 97])  # one query block per row, or many small ones
def test_probe_equals_eager_attention_weights(monkeypatch, num_key_value_heads, block_elements):
    from transformers.models.gemma4 import modeling_gemma4

    monkeypatch.setattr(probes, "PROBE_BLOCK_ELEMENTS", block_elements)
    model = vision_model(num_key_value_heads)
    attention = model.encoder.layers[-1].self_attn
    probe = NormedRotaryAttentionProbe(attention, modeling_gemma4.apply_multidimensional_rope,
                                       num_heads=2, num_key_value_heads=num_key_value_heads, scale=attention.scaling)
    weights: list[torch.Tensor] = []
    eager = modeling_gemma4.eager_attention_forward

    def recording(*args, **kwargs):
        output, attn_weights = eager(*args, **kwargs)
        weights.append(attn_weights)
        return output, attn_weights

    monkeypatch.setattr(modeling_gemma4, "eager_attention_forward", recording)
    # two batch rows: a full 9 x 5 grid, and a 6 x 4 grid padded with 21 padding patches
    positions = torch.stack([grid_positions(9, 5, 45), grid_positions(6, 4, 45)])
    padding = (positions == -1).all(dim=-1)
    embeds = torch.randn(2, 45, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), probe.capture() as captured:
        model.encoder(inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=positions)
    (got,) = captured
    assert torch.equal(probe.positions[0], positions)
    dense = weights[-1]  # [B, heads, queries, keys] of the last layer, padding keys masked out
    for row in range(2):
        valid = ~padding[row]
        expected = torch.zeros(45)
        expected[valid] = dense[row][:, valid][:, :, valid].mean(dim=(0, 1))
        assert torch.allclose(dense[row][:, valid][:, :, ~valid], torch.zeros(())), "eager masks padding keys"
        torch.testing.assert_close(got[row], expected, atol=1e-7, rtol=1e-5)
    assert expected[valid].std() > 0.2 * expected[valid].mean()  # far from uniform: the comparison has teeth
    assert got[1][padding[1]].eq(0).all()


def test_soft_token_attention_is_transformers_pooled_mean():
    """The layout of patch attention over soft tokens is the pooler's own: transformers' ``Gemma4VisionPooler``
    run on the attention as a 1-channel hidden state, unscaled, gives the same rows in the same order."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPooler

    config = tiny_gemma4.build_config(len(tiny_gemma4.vocabulary())).vision_config
    pooler = Gemma4VisionPooler(config)
    generator = torch.Generator().manual_seed(2)
    for cols, rows, total in ((30, 21, 630), (27, 6, 630), (9, 9, 81)):  # padded and unpadded images
        positions = grid_positions(cols, rows, total)
        attention = torch.rand(total, generator=generator)
        attention[(positions == -1).all(dim=-1)] = 0.0
        ours = gemma4.soft_token_attention(attention, positions, 3)
        pooled, mask = pooler(attention[None, :, None], positions[None], (positions == -1).all(dim=-1)[None],
                              total // 9)
        reference = pooled[mask][:, 0] / pooler.root_hidden_size
        assert ours.shape == (cols // 3 * rows // 3,)
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    # by hand: a 6 x 3 patch grid pools into 2 soft tokens, left block then right block
    positions = grid_positions(6, 3, 18)
    attention = torch.arange(18, dtype=torch.float32)
    left = attention.reshape(3, 6)[:, :3].mean()
    right = attention.reshape(3, 6)[:, 3:].mean()
    torch.testing.assert_close(gemma4.soft_token_attention(attention, positions, 3), torch.stack([left, right]))


def test_scored_rows_are_matched_to_items_by_positions():
    small, large = grid_positions(6, 3, 18), grid_positions(9, 6, 54)
    # the encoder ran the large view first, then both small views padded to 54 patches
    padded_small = torch.cat([small, small.new_full((36, 2), -1)])
    scores = [torch.full((1, 54), 1.0), torch.stack([torch.full((54,), 2.0), torch.full((54,), 3.0)])]
    positions = [large[None], torch.stack([padded_small, padded_small])]
    matched = gemma4.match_scored_rows(scores, positions, [small, large, small])
    assert [row.shape[0] for row in matched] == [18, 54, 18]
    assert [float(row[0]) for row in matched] == [2.0, 1.0, 3.0]  # equal views keep their order
    assert gemma4.match_scored_rows(scores, positions, [large, large]) is None  # no second large row


# -- processor -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_gemma4.build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"))


def make_processor(model_dir, **options):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from textscythe_vllm.plugin import register

    register()
    config = ModelConfig(model=str(model_dir), limit_mm_per_prompt={"image": 2, "video": 2}, **options)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(processor).__name__ == "TextScytheGemma4MultiModalProcessor"
    return processor


@pytest.fixture(scope="module")
def processor(model_dir):
    return make_processor(model_dir)


PROMPT = (
    "<bos><|turn>user\n<|video|>what is the dog doing ?<turn|>\n<|turn>model\nit is running<turn|>\n"
    "<|turn>user\n<|image|>and the car ?<turn|>\n<|turn>model\n"
)


def _apply(processor, prompt=PROMPT, **request_kwargs):
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    tokens = processor.info.get_tokenizer().encode(prompt, add_special_tokens=False)
    items = processor.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE)], "video": [tiny_video(2, NUM_FRAMES)]})
    return processor.apply(ProcessorInputs(tokens, items, hf_processor_mm_kwargs=request_kwargs),
                           TimingContext(enabled=False))


def embed_runs(result, modality: str) -> list[int]:
    """Lengths of the runs of embedding positions of the first item of ``modality`` (a video: one per frame)."""
    from textscythe_vllm.processing import embed_runs as runs

    placeholder = result["mm_placeholders"][modality][0]
    return runs(placeholder.is_embed.tolist()) if placeholder.is_embed is not None else [placeholder.length]


def non_embed_tokens(result, modality: str) -> list[int]:
    placeholder = result["mm_placeholders"][modality][0]
    ids = result["prompt_token_ids"][placeholder.offset:placeholder.offset + placeholder.length]
    return [token for token, embed in zip(ids, placeholder.is_embed.tolist(), strict=True) if not embed]


def test_processor_gives_images_and_frames_their_budget_quotas(processor):
    tokenizer = processor.info.get_tokenizer()
    full = _apply(processor)
    assert embed_runs(full, "image") == [70]
    assert embed_runs(full, "video") == [FRAME_TOKENS] * NUM_FRAMES
    for budget in (1, 10, 69, 70, 100, 252, 1000):
        result = _apply(processor, visual_token_budget=budget, visual_token_selector="cls_attention")
        assert embed_runs(result, "image") == [min(budget, 70)]
        quotas = [quota for quota in spread_budget(budget, [FRAME_TOKENS] * NUM_FRAMES) if quota] \
            if budget < FRAME_TOKENS * NUM_FRAMES else [FRAME_TOKENS] * NUM_FRAMES
        assert embed_runs(result, "video") == quotas
        removed = 70 - min(budget, 70) + FRAME_TOKENS * NUM_FRAMES - sum(quotas)
        assert len(result["prompt_token_ids"]) == len(full["prompt_token_ids"]) - removed
        # every frame's timestamp and <|image> / <image|> markers stay, in order
        assert non_embed_tokens(result, "video") == non_embed_tokens(full, "video")
        plans = {m: ItemPlan.decode(result["mm_kwargs"][m][0][plan_field(m)].data) for m in ("image", "video")}
        assert {plan.budget for plan in plans.values()} == {budget}
        words = tokenizer.convert_ids_to_tokens
        assert words(list(plans["video"].instruction)) == ["what", "is", "the", "dog", "doing", "?"]
        assert words(list(plans["image"].instruction)) == ["and", "the", "car", "?"]
    assert spread_budget(10, [FRAME_TOKENS] * NUM_FRAMES) == [3, 3, 2, 2]  # the quotas the model selects by


def test_metrics_count_unpruned_tokens_per_item(processor):
    items = processor.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE)], "video": [tiny_video(2, NUM_FRAMES)]})
    assert processor._unpruned_token_count(items["image"], 0, "image") == 70
    assert processor._unpruned_token_count(items["video"], 0, "video") == FRAME_TOKENS * NUM_FRAMES


def test_server_wide_max_soft_tokens_composes_with_budgets(model_dir):
    """The server's ``--mm-processor-kwargs`` ``max_soft_tokens`` reaches Gemma 4, and budgets then prune the
    larger images it gives."""
    wide = make_processor(model_dir, mm_processor_kwargs={"max_soft_tokens": 140})
    items = wide.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE)], "video": [tiny_video(2, NUM_FRAMES)]})
    image_tokens = wide._unpruned_token_count(items["image"], 0, "image")
    assert 70 < image_tokens <= 140
    assert embed_runs(_apply(wide), "image") == [image_tokens]
    assert embed_runs(_apply(wide), "video") == [FRAME_TOKENS] * NUM_FRAMES  # frames stay at 70 in vLLM
    for budget in (10, 100, image_tokens, 500):
        assert embed_runs(_apply(wide, visual_token_budget=budget), "image") == [min(budget, image_tokens)]


def test_request_max_soft_tokens_lowers_resolution_never_above_the_servers(model_dir, processor):
    """A request's ``max_soft_tokens`` reaches Gemma 4 when it is one of Gemma 4's values and not above the
    server's: images get at most that many soft tokens, budgets prune those, the metrics count them, videos stay at
    70 per frame, and the item hash changes with it (no cache mixes resolutions). Anything else is refused."""
    from textscythe_vllm.processing import carrying_request_options
    from textscythe_vllm.request import PruningRequestError

    wide = make_processor(model_dir, mm_processor_kwargs={"max_soft_tokens": 140})
    items = wide.info.parse_mm_data({"image": [scene(1, *IMAGE_SIZE)]})
    stock = _apply(wide)
    lowered = _apply(wide, max_soft_tokens=70)
    assert embed_runs(lowered, "image") == [70] and embed_runs(stock, "image")[0] > 70
    assert embed_runs(lowered, "video") == [FRAME_TOKENS] * NUM_FRAMES
    assert embed_runs(_apply(wide, max_soft_tokens=70, visual_token_budget=10), "image") == [10]
    assert embed_runs(_apply(wide, max_soft_tokens=140), "image") == embed_runs(stock, "image")
    assert embed_runs(_apply(wide, max_soft_tokens=None), "image") == embed_runs(stock, "image")
    assert lowered["mm_hashes"]["image"] != stock["mm_hashes"]["image"]
    assert lowered["mm_hashes"]["video"] != stock["mm_hashes"]["video"]  # stock vLLM hashes every item with it
    with carrying_request_options({"max_soft_tokens": 70}):
        assert wide._unpruned_token_count(items["image"], 0, "image") == 70
    for bad in (280, 1120, 100, 0, -70, "70", 70.0, True, [70], {"x": 70}):
        with pytest.raises(PruningRequestError, match=r"'max_soft_tokens' must be one of \[70, 140\]") as error:
            _apply(wide, max_soft_tokens=bad)
        assert error.value.param == "max_soft_tokens"
    with pytest.raises(PruningRequestError, match=r"one of \[70\] on this server"):
        _apply(processor, max_soft_tokens=140)  # the checkpoint's own 70 is this server's ceiling
    assert embed_runs(_apply(processor, max_soft_tokens=70), "image") == [70]


def test_prompt_and_hashes_are_stock_vllms_with_and_without_the_option(model_dir):
    """Without a budget, a request with or without ``max_soft_tokens`` gets stock vLLM's prompt and item hashes
    (so its cache entries are stock's too)."""
    from textscythe_vllm._vllm import Gemma4MultiModalProcessor, Gemma4ProcessingInfo

    wide = make_processor(model_dir, mm_processor_kwargs={"max_soft_tokens": 140})
    stock = Gemma4MultiModalProcessor(Gemma4ProcessingInfo(wide.info.ctx), wide.dummy_inputs)
    for options in ({}, {"max_soft_tokens": 70}):
        ours, theirs = _apply(wide, **options), _apply(stock, **options)
        assert ours["mm_hashes"] == theirs["mm_hashes"]
        assert ours["prompt_token_ids"] == theirs["prompt_token_ids"]
    assert _apply(stock)["mm_hashes"] != _apply(stock, max_soft_tokens=70)["mm_hashes"]


def test_other_request_processor_options_are_dropped(processor):
    """Only the top-level ``max_soft_tokens`` is admitted (and checked): the nested form Gemma 4 also reads, which
    would give this image 126 soft tokens, never reaches it."""
    assert embed_runs(_apply(processor, images_kwargs={"max_soft_tokens": 140}), "image") == [70]
